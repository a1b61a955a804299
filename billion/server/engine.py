"""Continuous batching in the server: each engine's requests decode together.

Each engine has one worker thread that owns its BatchGenerator (backends/batching.py): up to
`parallel` requests decode together (llama-server's slots), the rest wait in a bounded queue
(when it is full a request is refused with 429 and Retry-After), a request arriving mid-batch
joins at the next step, and a request whose client is gone (while decoding or while queued)
leaves at the next step. The event loop never touches a generator: it sends commands to the
worker (add, cancel) through a thread-safe queue and receives Chunks back through each request's
asyncio queue. Each request's side of the events (detokenizing, stop strings, EOS, max_tokens,
logprobs, its finish reason) is its own batching.Output, so no request sees another's tokens or
stop strings.

Engines without a batched KV cache (the llama.cpp peer) serve one request at a time through the
same worker, on their KV session (Backend.batch gives them a batch of one).

The prompt cache is the batch generator's: the KV rows of recently finished requests, reused by
any request whose prompt starts with one of them (a conversation's next turn), and reported as
`usage.prompt_tokens_details.cached_tokens`. It is partitioned by salt: a request with a
`cache_salt` (vLLM's field) reuses only rows cached under the same salt, and with several API keys
each key is a salt of its own; requests with neither share one partition, so such a client can
learn from cached_tokens (and from its TTFT) how much of its prompt an earlier client sent.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from backends import constraints
from backends.base import Backend
from backends.batching import BatchGenerator, Output, logprob_entry
from backends.scoring import PromptLogprobs
from backends.types import Chunk, GenerationConfig
from billion.server import tool_formats

log = logging.getLogger("billion.server")


class QueueFull(Exception):
    """Every slot is busy and the queue is full: the client should retry later (429)."""


class ShuttingDown(Exception):
    """The server is stopping: no new requests, and queued ones are refused (503)."""


class EngineFailed(ShuttingDown):
    """The engine's worker thread died: its requests fail, new ones are refused (503), /health
    says so and the server shuts down (billion/commands/serve.py)."""


@dataclass
class Request:
    """One request as the worker sees it: what to generate, where its chunks go, its text side."""

    prompt_ids: list[int]
    gen: GenerationConfig
    put: Callable  # hands an item (a Chunk, _DONE or an exception) to the request's event loop
    output: Output  # its text, logprobs and finish reason
    uid: int | None = None  # the batch generator's, once added
    tokens: int = 0
    reason: str = "interrupted"
    salt: str | None = None  # its prompt-cache partition (cache_salt, and the API key when there are several)
    deadline: float | None = None  # time.monotonic() past which the worker ends it ("max_time")
    timed_out: bool = False
    finished: bool = False  # answered: its slot is free, nothing more goes to it
    refused: bool = False  # still queued when shutdown began


_DONE = object()  # the worker's last item for a request: its generation ended without an error


class Engine:
    """One loaded model on one engine, its requests decoded together by a worker thread."""

    def __init__(self, backend: Backend, parallel: int = 8, queue_size: int = 64, timeout_s: float | None = None,
                 draft=None, num_draft: int = 4, prefill_chunk: int | None = None, tool_format: str = "auto"):
        self.backend = backend
        # how its model calls tools (server/tool_formats/), and why that one
        self.tool_format, self.tool_format_why = tool_formats.choose(getattr(backend.tokenizer, "chat_template", None),
                                                                     tool_format)
        self.prefill_chunk = prefill_chunk  # prompt tokens prefilled per step at most
        self.draft, self.num_draft = draft, num_draft  # prompt lookup inside the batch (an NgramDraft)
        # requests are parsed, rendered and tokenized in other threads: on a copy of the backend with
        # its own tokenizer (the worker detokenizes with the original at the same time), one at a time.
        # The copy's grammar view (built on its tokenizer, by the thread that checks a request's
        # grammar first) is the worker's too: a request's grammar is compiled once, when it is checked.
        self.prep = copy.copy(backend)
        self.prep.tokenizer = copy.deepcopy(backend.tokenizer)
        self.prep.grammars = constraints.Grammars(self.prep.tokenizer, backend.vocab_size, backend.eos_ids)
        backend.grammars = self.prep.grammars
        self.prep_lock = threading.Lock()
        self.scorer = PromptLogprobs(backend)  # echo's prompt log-probabilities (the worker's)
        self.timeout_s = timeout_s
        self.parallel = parallel if backend.can_batch else 1
        self.queue_size = queue_size
        self.pending = 0  # requests submitted and not yet finished by the worker
        self.pending_lock = threading.Lock()
        # (tokens, finish_reason) of the last finished generations: what tests and /health read
        self.done: deque = deque(maxlen=100)
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.closing = False
        self.draining = False  # shutting down: in-flight requests finish, queued and new ones are refused
        self.failure: str | None = None  # why the worker thread died (it never should)
        # what /health reports, replaced whole by the worker after each step (a reader never sees
        # half of one): batch steps run, tokens generated, and what it holds across requests
        self.stats = {"steps": 0, "generated_tokens": 0,
                      "held": {"running": 0, "queued": 0, "prompt_cache": 0, "prompt_cache_tokens": 0}}
        first = self.new_batch()  # here, not in the worker: an engine that cannot is a UserError at start-up
        self.thread = threading.Thread(target=self._run, args=(first,), name=f"billion-{backend.name}", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return self.pending > 0

    def new_batch(self) -> BatchGenerator:
        return self.backend.batch(max_batch=self.parallel, prompt_cache_size=self.parallel, draft=self.draft,
                                  num_draft=self.num_draft, prefill_chunk=self.prefill_chunk)

    # ------------------------------------------------------------ event-loop side

    def submit(self, prompt_ids: list[int], gen: GenerationConfig, put: Callable, salt: str | None = None) -> Request:
        """Queue a request (QueueFull when every slot and queue place is taken)."""
        self.backend.check_fits(len(prompt_ids), gen.max_tokens)
        if self.failure is not None:
            raise EngineFailed(self.failure)
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        with self.pending_lock:
            if self.pending >= self.parallel + self.queue_size:
                raise QueueFull(f"{self.pending} requests are being served or queued on {self.backend.name}")
            self.pending += 1
        req = Request(list(prompt_ids), gen, put, Output(self.backend.tokenizer, self.backend.eos_ids, gen), salt=salt)
        if self.timeout_s:
            req.deadline = time.monotonic() + self.timeout_s
        self.commands.put(("add", req))
        if self.failure is not None:  # the worker died meanwhile: nobody would take the command
            self._fail_commands()
        return req

    def cancel(self, req: Request) -> None:
        self.commands.put(("cancel", req))

    async def prompt_logprobs(self, prompt_ids: list[int], top: int, salt: str | None = None) -> list[tuple]:
        """The prompt's own tokens as logprob entries (text, log-probability, top alternatives), the
        first one's log-probability None (nothing predicts it): what `echo` with `logprobs` answers,
        so lm-eval scores log-likelihoods over HTTP. Run by the worker thread (it owns the model)
        between two batch steps, on its scoring session (scoring.PromptLogprobs: the prefix the
        last echoed prompt of the same salt shares is not computed again)."""
        if self.failure is not None:
            raise EngineFailed(self.failure)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def work():
            scored = self.scorer(prompt_ids, top, salt)
            first = (self.backend.tokenizer.decode([prompt_ids[0]]), None, ())
            return [first] + [logprob_entry(self.backend.tokenizer, token, *e) for token, e in zip(prompt_ids[1:], scored)]

        self.commands.put(("call", (work, loop, done)))
        return await done

    def drain(self) -> None:
        """Shutdown begins: refuse new requests and the queued ones (503); in-flight ones go on."""
        self.draining = True
        self.commands.put(("drain", None))

    def close(self) -> None:
        """Stop the worker after its current step (requests still there get an error) and wait for
        it: the backend may be closed only once no step can be running on it."""
        self.closing = True
        self.commands.put(("wake", None))
        self.thread.join()

    # ------------------------------------------------------------ the worker thread

    def _run(self, batch: BatchGenerator) -> None:
        requests: dict[int, Request] = {}  # by uid: the requests the batch holds
        try:
            self._serve(batch, requests)
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave requests waiting forever
            self.failure = f"the {self.backend.name} engine's worker thread failed ({type(e).__name__}: {e})"
            log.critical("%s", self.failure, exc_info=(type(e), e, e.__traceback__))
            for req in requests.values():
                self._finish(req, "error", e)
            self._fail_commands()
            return
        for req in requests.values():
            self._finish(req, "error", ShuttingDown("the server is shutting down"))

    def _serve(self, batch: BatchGenerator, requests: dict) -> None:
        while not self.closing:
            self._take_commands(batch, requests, block=not batch.busy)
            if not batch.busy:
                continue
            self._expire(batch, requests)
            try:
                events = batch.step(news=lambda: not self.commands.empty())
            except Exception as e:  # noqa: BLE001 - an engine failure fails its requests, not the server
                for req in requests.values():
                    self._finish(req, "error", e)
                requests.clear()  # the same dict: _run answers what it holds if the worker dies later
                batch = self.new_batch()
                continue
            for event in events:
                self._deliver(batch, requests, event)
            self.stats = {"steps": self.stats["steps"] + 1,
                          "generated_tokens": self.stats["generated_tokens"] + sum(e.token is not None for e in events),
                          "held": {"running": len(batch.rows), "queued": len(batch.waiting),
                                   "prompt_cache": len(batch.prompt_cache),
                                   # its KV rows' memory follows their tokens (the key: salt, then ids)
                                   "prompt_cache_tokens": sum(len(key) - 1 for key in batch.prompt_cache)}}

    def _fail_commands(self) -> None:
        """After the worker died: every request it had not taken yet fails too."""
        while True:
            try:
                kind, req = self.commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._finish(req, "error", EngineFailed(self.failure))
            elif kind == "call":
                _resolve(req[1], req[2], error=EngineFailed(self.failure))

    @staticmethod
    def _call(work: Callable, loop, done) -> None:
        """Work the event loop handed the worker (prompt_logprobs): its result or its error, back."""
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - that request's failure, answered to it
            _resolve(loop, done, error=e)
        else:
            _resolve(loop, done, result)

    def _expire(self, batch: BatchGenerator, requests: dict) -> None:
        """Requests past their time (--request-timeout) leave the batch at this step."""
        now = time.monotonic()
        for uid, req in requests.items():
            if req.deadline is not None and now > req.deadline and not req.timed_out:
                req.timed_out = True
                batch.cancel(uid)

    def _take_commands(self, batch: BatchGenerator, requests: dict, block: bool) -> None:
        while True:
            try:
                kind, req = self.commands.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                try:
                    req.uid = batch.add(req.prompt_ids, req.gen, req.salt)
                except Exception as e:  # noqa: BLE001 - checked before it was queued: only a bug gets here
                    self._finish(req, "error", e)
                    continue
                requests[req.uid] = req
            elif kind == "call":
                self._call(*req)
            elif kind == "cancel" and req.uid in requests:
                batch.cancel(req.uid)
            elif kind == "drain":
                for uid in batch.queued:
                    requests[uid].refused = True
                    batch.cancel(uid)

    def _deliver(self, batch: BatchGenerator, requests: dict, event) -> None:
        """One event to its request. A failure here (detokenizing, say) is that request's alone: it
        leaves the batch and is answered with the error; the others go on."""
        req = requests.get(event.uid)
        if req is None:
            return
        try:
            self._apply(batch, requests, req, event)
        except Exception as e:  # noqa: BLE001 - this request's own text side
            requests.pop(event.uid, None)
            batch.cancel(event.uid)
            self._finish(req, "error", e)

    def _apply(self, batch: BatchGenerator, requests: dict, req: Request, event) -> None:
        out = req.output
        running = out.finish_reason is None
        chunks = out.take(event)
        for chunk in chunks:
            req.tokens += 1
            req.put(chunk)
        if running and out.finish_reason and not event.finish_reason:  # a stop string: the batch need not go on
            batch.cancel(event.uid)
        if event.finish_reason == "error":  # its own work failed; the batch goes on
            del requests[event.uid]
            self._finish(req, "error", event.error)
        elif req.refused:  # queued when shutdown began
            del requests[event.uid]
            self._finish(req, "refused", ShuttingDown("the server is shutting down"))
        elif event.finish_reason:
            del requests[event.uid]
            reason = out.finish_reason
            if reason not in ("eos", "max_tokens", "stop"):  # it left the batch before its end
                reason = "max_time" if req.timed_out else "interrupted"
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        req.reason = reason
        self.done.append((req.tokens, reason))
        with self.pending_lock:  # its slot (or queue place) is free once the worker lets go
            self.pending -= 1
        req.put(error if error is not None else _DONE)


def _on_loop(loop, fn, *args) -> None:
    """fn(*args) on the event loop, from the worker thread (asyncio's objects are not thread-safe)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is gone (shutdown)
        pass


def _resolve(loop, future, result=None, error: BaseException | None = None) -> None:
    """Settle an event-loop future from the worker thread (unless its request went away first)."""
    def settle():
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)
    _on_loop(loop, settle)


# ---------------------------------------------------------------- the request's side


class Generation:
    """One request's chunks as an async iterator, fed by the engine's worker. It ends early when its
    client hangs up (`watch`) or when it is closed (`aclose`): the request leaves the batch at the
    next step, whatever state it is in (queued, prefilling, decoding; streamed or not)."""

    def __init__(self, engine: Engine, prompt_ids: list[int], gen: GenerationConfig, salt: str | None = None):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request = engine.submit(prompt_ids, gen, self._put, salt)
        self.ended = False
        self.client_gone = False
        self.watcher: asyncio.Task | None = None

    def _put(self, item) -> None:  # from the worker thread
        _on_loop(self.loop, self.queue.put_nowait, item)

    def watch(self, receive, request_id: str | None = None, siblings: tuple = ()) -> None:
        """Cancel the request as soon as its client hangs up. `receive` is the request's ASGI
        receive, its body already read: the next message it gives is http.disconnect, which uvicorn
        sends when the connection closes (or once the answer is complete). Waiting on it costs
        nothing and does not depend on the answer being streamed or on a chunk arriving.
        `siblings`: the other generations of the same request (n > 1), cancelled with it (one
        connection has one disconnect, so one of them watches)."""

        async def until_gone():
            while (await receive())["type"] != "http.disconnect":
                pass
            group = [g for g in (self, *siblings) if not g.ended]
            if group:
                log.info("request %s: the client left; the request is cancelled", request_id or "?")
            for generation in group:
                generation.client_gone = True
                await generation.aclose()

        self.watcher = asyncio.create_task(until_gone())

    @property
    def cached(self) -> int:
        return self.request.output.cached_tokens

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
        if self.ended and self.queue.empty():  # its end was read (by first(), or it was closed): no more
            raise StopAsyncIteration
        item = await self.queue.get()
        if item is _DONE or isinstance(item, BaseException):
            self.ended = True
            if self.watcher is not None:
                self.watcher.cancel()
            if item is _DONE:
                raise StopAsyncIteration
            raise item
        return item

    async def first(self) -> Chunk | None:
        """The first chunk (None: the generation ended without one, e.g. its client left while it
        was queued), so that a refusal or an error before the first token is answered with its own
        status."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return None

    async def aclose(self) -> None:
        """Stop early (the client is gone, or the answer stopped reading): the request leaves the
        batch at the next step. Nothing is awaited here: this runs while Starlette cancels a
        disconnected client's response."""
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()
        if not self.ended:
            self.ended = True
            self.engine.cancel(self.request)
