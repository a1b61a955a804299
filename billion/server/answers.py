"""How every dialect answers: a prepared request's generations run in the engine's batch, and their
one stream of chunks is handed to the dialect's renderer, as one JSON body or as server-sent
events. Each choice of an answer is a Reply: the answer's side of one generation (its id, its
counts, its logprobs not yet shown, its tool calls once read), holding that Generation (the
engine's side: engine.Request and its batching.Output) and its first chunk. A dialect reads a
reply's text through `collected` (a JSON answer) or `shown` (a stream; tool calls held back and
read in the engine's tool format), so no dialect knows how a generation runs or how a model writes
its tool calls.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from backends.types import GenerationConfig, UserError
from billion.server.engine import Engine, Generation, QueueFull, ShuttingDown
from billion.server.errors import gone, refusal, request_id
from billion.server.metrics import ServerMetrics
from billion.server.requests import ChatRequest, RequestBase


def cache_salt(request: Request, req: RequestBase) -> str | None:
    """The request's prompt-cache partition: its cache_salt, and its API key when the server has
    several (each key its own salt by default); None shares the cache with every such request."""
    parts = []
    if len(request.app.state.access.api_keys) > 1:
        parts.append("key:" + request.state.api_key)
    if req.cache_salt:
        parts.append("salt:" + req.cache_salt)
    return "\0".join(parts) or None


@dataclass
class Reply:
    """One choice of an answer, the answer's side of its generation. kind: "chat" or "text"."""

    kind: str
    model: str
    prompt_ids: list[int]
    include_usage: bool = False
    calls_tools: bool = False  # the reply is parsed for tool calls, in its engine's tool_format
    tool_format: Any = None  # a server/tool_formats module
    logprobs: bool = False
    metrics: ServerMetrics | None = None  # /metrics: its inter-token latencies and token counts
    index: int = 0  # the choice this reply is (n > 1: one Reply per choice, one id)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])  # the answer's (a dialect prefixes it)
    created: int = field(default_factory=lambda: int(time.time()))
    generation: Generation | None = None  # its chunks, from the engine, once submitted
    first: Any = None  # its first chunk (None: it ended without one), read before the answer begins
    # filled while the generation runs
    tokens: int = 0
    reason: str = "eos"
    cached: int = 0
    entries: list = field(default_factory=list)  # (Chunk.logprobs, text offset) not yet answered
    offset: int = 0  # characters of text answered so far (the legacy logprobs' text_offset)
    last: float | None = None  # when the last chunk came (perf_counter)
    echo: str = ""  # the prompt, repeated before the completion (/v1/completions' echo)
    gone: bool = False  # its client hung up while it streamed
    calls: list = field(default_factory=list)  # its tool calls in OpenAI's shape, once read (called)

    def count(self, chunk) -> None:
        """Count one generated chunk."""
        now = time.perf_counter()
        if self.last is not None and self.metrics is not None:
            self.metrics.itl.labels(self.model).observe(now - self.last)
        self.last = now
        self.cached = self.generation.cached
        self.tokens += 1
        self.reason = chunk.finish_reason or self.reason
        if chunk.logprobs is not None:
            self.entries.append((chunk.logprobs, self.offset))
        self.offset += len(chunk.text)

    def echoed(self, text: str, entries: list[tuple]) -> None:
        """The prompt goes first (`echo`): its text, and (with logprobs) its own tokens' entries."""
        self.echo = text
        for entry in entries:
            self.entries.append((entry, self.offset))
            self.offset += len(entry[0])
        self.offset = len(text)  # the completion's text follows the prompt's

    def finished(self) -> None:
        """Its generation ended (not abandoned): past its time, it says so; a completion (kind
        "text") ended at EOS with logprobs lists the EOS token's entry last, as vLLM does:
        lm-eval's local-completions reads an echoed prompt's log-probabilities as every entry but
        the last, the generated one (a chat reply's content logprobs stay its text's)."""
        request = self.generation.request
        if request.reason == "max_time":
            self.reason = "max_time"
        if self.kind == "text" and self.logprobs and request.output.eos_logprobs is not None:
            self.entries.append((request.output.eos_logprobs, self.offset))

    def called(self, calls: list) -> None:
        """The reply's tool calls, once read. A reply that ended at EOS after tool calls finishes
        with "tool_calls" (one cut by a limit keeps its own reason)."""
        self.calls = calls
        if calls and self.reason == "eos":
            self.reason = "tool_calls"

    def take_entries(self) -> list:
        """The logprob entries counted since the last call (each with its text offset)."""
        entries, self.entries = self.entries, []
        return entries

    async def close(self) -> None:
        """The generation is over (finished, failed or abandoned): the engine lets it go (a client
        gone: it leaves the batch at the next step) and its tokens go to /metrics."""
        await self.generation.aclose()
        if self.metrics is not None:
            self.metrics.ended(self.model, len(self.prompt_ids), self.tokens, self.cached)


Answer = Callable[[list[Reply]], Awaitable[Response]]  # a dialect's JSON answer of its replies
Events = Callable[[Request, list[Reply]], AsyncIterator[str]]  # a dialect's stream of its replies


async def respond(request: Request, req: RequestBase, engine: Engine, prompt_ids: list[int], gen: GenerationConfig,
                  answer: Answer, events: Events, *, kind: str = "chat", echo: str | None = None) -> Response:
    """The answer to a prepared request, rendered by its dialect: `answer(replies)` (a JSON body) or
    `events(request, replies)` (server-sent events, when req.stream). There are req.n replies, each
    its own generation in the engine's batch with its own seed (seed + i when the request has one);
    each takes a slot: with n beyond what the engine can hold or queue, the request gets 429 whole
    (the choices already queued are cancelled). kind: "chat" or "text" (Completions). `echo`: the
    prompt's text, repeated before the completion (with logprobs, the prompt tokens' own first)."""
    replies = [Reply(kind, req.model, prompt_ids, include_usage=req.include_usage,
                     calls_tools=isinstance(req, ChatRequest) and req.calls_tools, logprobs=gen.logprobs is not None,
                     metrics=request.app.state.metrics, index=i, tool_format=engine.tool_format)
               for i in range(req.n)]
    for reply in replies[1:]:
        reply.id, reply.created = replies[0].id, replies[0].created
    # No answer starts before the first token exists: a full queue (429), a shutdown that refuses
    # the queued request (503) or an error before any token (400) is the answer's status, not an event.
    generations: list[Generation] = []
    salt = cache_salt(request, req)
    try:
        if echo is not None:
            entries = await engine.prompt_logprobs(prompt_ids, gen.logprobs, salt) if gen.logprobs is not None else []
            for reply in replies:
                reply.echoed(echo, entries)
        for i in range(req.n):
            seeded = replace(gen, seed=None if gen.seed is None else gen.seed + i)
            generations.append(Generation(engine, prompt_ids, seeded, salt))
        # a client that hangs up, in any state, is cancelled (one connection: one watcher for all)
        generations[0].watch(request.receive, request_id(request), siblings=tuple(generations[1:]))
        firsts = await asyncio.gather(*(g.first() for g in generations))
        ttft_s = time.perf_counter() - request.state.arrived  # the server's own time to first token
        request.app.state.metrics.ttft.labels(req.model).observe(ttft_s)
    except (QueueFull, ShuttingDown, UserError) as e:
        for generation in generations:
            await generation.aclose()
        raise refusal(e) from None
    if any(g.client_gone for g in generations):
        return gone()
    for reply, generation, first in zip(replies, generations, firsts):
        reply.generation, reply.first = generation, first
    # The server's own time to first token (queue, tokenizing and prefill included) as a Server-Timing
    # header: browsers show it in their network panel and hand it to pages; the arena page puts it
    # beside the time it measured itself.
    headers = {"Server-Timing": f"ttft;dur={ttft_s * 1000:.1f}"}
    if req.stream:
        return StreamingResponse(events(request, replies), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    response = await answer(replies)
    response.headers.update(headers)
    return response


async def _chunks(reply: Reply):
    """The reply's chunks, its first one included."""
    if reply.first is not None:
        yield reply.first
    async for chunk in reply.generation:
        yield chunk


async def collected(reply: Reply) -> str | None:
    """A reply's whole text, every chunk counted (None: its client is gone). A failure before the
    end is the answer's status (400, 503): a JSON answer has not begun. Every dialect's JSON
    answer starts here."""
    text = []
    try:
        async for chunk in _chunks(reply):
            reply.count(chunk)
            text.append(chunk.text)
    except (UserError, ShuttingDown) as e:
        raise refusal(e) from None
    finally:
        await reply.close()
    if reply.generation.client_gone:
        return None
    reply.finished()
    return "".join(text)


async def shown(reply: Reply) -> AsyncIterator[str]:
    """A streamed reply's text as it may be shown (where a tool call may begin, its format holds the
    text back), every chunk counted; at its end the tool calls found are in `reply.calls`. Nothing
    more once its client is gone (`reply.gone`). Every dialect's stream reads its reply through
    this, and closes the reply (Reply.close) when its stream ends, however it ends."""
    calls = reply.tool_format.stream() if reply.calls_tools else None
    async for chunk in _chunks(reply):
        reply.count(chunk)
        piece = calls.push(chunk.text) if calls else chunk.text
        if piece:
            yield piece
    if reply.generation.client_gone:
        reply.gone = True
        return
    reply.finished()
    found: list = []
    if calls:
        rest, found = calls.finish()
        if rest:
            yield rest
    reply.called(found)
