"""One generation per engine at a time: the engine's lock, its worker thread, its prompt cache.

`generate` is the one place a request reaches an engine: it waits for the engine's asyncio lock
(requests queue in arrival order), runs the backend's stream in the engine's worker thread (the
event loop keeps answering other requests meanwhile) and hands the chunks back to the event loop.
A scheduler that batches requests would replace this module, not the routes.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from backends.base import Backend
from backends.sessions import PromptCache
from backends.types import Chunk, GenerationConfig


@dataclass
class Engine:
    """One loaded model on one engine, served one generation at a time."""

    backend: Backend
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "billion-engine"))
    cache: PromptCache | None = None
    # (tokens, finish_reason) of the last finished generations: what tests read
    done: deque = field(default_factory=lambda: deque(maxlen=100))
    busy: bool = False

    def __post_init__(self):
        if self.cache is None:
            self.cache = PromptCache(self.backend)


_DONE = object()  # the worker's last item: the stream ended without an error


def _work(engine: Engine, prompt_ids: list[int], gen: GenerationConfig, put: Callable,
          cancel: threading.Event) -> None:
    """In the engine's worker thread: stream the generation into `put`, one chunk at a time, then
    _DONE or the exception. It checks `cancel` after each token (the request is gone), and records
    (tokens, reason) in engine.done whatever happens ("interrupted" when cancelled)."""
    tokens, reason = 0, "interrupted"
    try:
        stream = engine.backend.stream(prompt_ids, gen, cache=engine.cache)
        try:
            for chunk in stream:
                tokens += 1
                if chunk.finish_reason:
                    reason = chunk.finish_reason
                put(chunk)
                if cancel.is_set():
                    break
            else:
                reason = reason if reason != "interrupted" else "eos"
        finally:
            stream.close()
        put(_DONE)
    except BaseException as e:  # noqa: BLE001 - handed to the request, which answers it
        reason = "error"
        put(e)
    finally:
        engine.done.append((tokens, reason))


async def _start(engine: Engine, work: Callable[[], None]) -> None:
    """Take the engine's lock (waiting behind earlier requests) and run `work` in its thread. The
    lock is released when the thread finishes, not when the request does: a request that gives up
    early must not let the next one in while the engine is still in use."""
    await engine.lock.acquire()
    engine.busy = True
    try:
        future = asyncio.get_running_loop().run_in_executor(engine.executor, work)
    except BaseException:
        engine.busy = False
        engine.lock.release()
        raise

    def release(_):
        engine.busy = False
        engine.lock.release()

    future.add_done_callback(release)


async def generate(engine: Engine, prompt_ids: list[int], gen: GenerationConfig) -> AsyncIterator[Chunk]:
    """The engine's chunks for one request, produced in its worker thread while this request holds
    the engine's lock. Closing this generator early (a client gone) stops the engine's stream after
    its current token; the lock is released only once the thread has let go of the engine."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(item) -> None:  # from the worker thread: asyncio.Queue is not thread-safe
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            cancel.set()

    await _start(engine, lambda: _work(engine, prompt_ids, gen, put, cancel))
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
