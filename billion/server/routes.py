"""The routes, as top-level functions on one APIRouter, and the answers they give.

Shared state comes from `request.app.state` (set by app.create_app): `engines` {model id: Engine},
`owner` (what /v1/models reports as owned_by) and `created` (the server's start time). Each
completion route parses and checks its request (schema.py), then `respond` runs the generation
(engine.generate) and answers with one JSON body or a server-sent-event stream.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

from backends.types import GenerationConfig, UserError
from billion.server.engine import Engine, Generation, QueueFull, ShuttingDown
from billion.server.metrics import CONTENT_TYPE, ServerMetrics
from billion.server.schema import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest, RequestBase,
                                   TokenizeRequest, chat_prompt, completion_prompt, generation_config, internal_error,
                                   output_grammar, parse_request, served_model, single_prompt)

router = APIRouter()

FINISH = {"eos": "stop", "stop": "stop", "max_tokens": "length", "max_time": "length", "tool_calls": "tool_calls"}
RETRY_AFTER_S = 1  # a slot frees up as soon as any request finishes


def gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": the answer to no one

# ---------------------------------------------------------------- errors


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return e.response(request.url.path)


async def unexpected_error(request: Request, e: Exception) -> JSONResponse:
    # this handler runs outside the middleware that sets the header (and counts the answer) on every other one
    response = internal_error(e, request_id(request)).response(request.url.path)
    response.headers["X-Request-ID"] = request_id(request) or ""
    request.app.state.metrics.answered(request.url.path, response.status_code)
    return response


def cache_salt(request: Request, req: RequestBase) -> str | None:
    """The request's prompt-cache partition: its cache_salt, and its API key when the server has
    several (each key its own salt by default); None shares the cache with every such request."""
    parts = []
    if len(request.app.state.access.api_keys) > 1:
        parts.append("key:" + request.state.api_key)
    if req.cache_salt:
        parts.append("salt:" + req.cache_salt)
    return "\0".join(parts) or None


def request_id(request: Request) -> str | None:
    """The id the server gave this request (app.py's middleware): in the X-Request-ID header of
    every answer, in a 500's message, and in the server log beside the traceback."""
    return getattr(request.state, "request_id", None)


# ---------------------------------------------------------------- routes


@router.get("/health")
async def health(request: Request):
    """200 while every engine's worker runs, else 503 naming what failed (the server is then shutting
    down). Per model id: requests in flight or queued, and its engine's batch steps run, tokens
    generated and what it holds (rows decoding, requests queued, prompt-cache rows and their tokens)
    as of its last step."""
    engines = request.app.state.engines
    failed = sorted({e.failure for e in engines.values() if e.failure})
    body = {"status": "error" if failed else "ok", "models": list(engines),
            "busy": sorted({k for k, v in engines.items() if v.busy}),
            "requests": {k: v.pending for k, v in engines.items()},  # decoding or queued, per model id
            "engines": {k: v.stats for k, v in engines.items()}}
    if failed:
        body["failed"] = failed
    return JSONResponse(body, status_code=503 if failed else 200)


PAGE = Path(__file__).resolve().parent / "page"  # the arena's static files


@router.get("/", include_in_schema=False)
async def arena():
    """The arena page: type once, every served engine answers in its own column (page/arena.js)."""
    return FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/report", include_in_schema=False)
async def report(request: Request):
    """The records of --results as one page, read afresh at each visit (a benchmark that just wrote
    a record shows up on reload)."""
    folder = request.app.state.results
    if folder is None:
        raise APIError(404, "this server shows no records: start it with --results DIR", code="not_found")
    return HTMLResponse(await run_in_threadpool(_report_page, folder))


def _report_page(folder: str) -> str:
    from billion.records.html import empty_page, page
    from billion.records.store import read_records

    records = read_records([folder])
    return page(records) if records else empty_page(folder)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    """Prometheus' text format (metrics.py)."""
    return Response(request.app.state.metrics.text(), media_type=CONTENT_TYPE)


@router.post("/tokenize")
async def tokenize(request: Request):
    """vLLM's /tokenize: {"model", "prompt", "add_special_tokens"} or {"model", "messages",
    "add_generation_prompt"} (rendered with the chat template, as /v1/chat/completions renders
    them) -> {"tokens", "count", "max_model_len"}."""
    return await _off_the_loop(request, _tokenize)


async def _off_the_loop(request: Request, work):
    """work(body, engines), the body read within the size limit, run in a worker thread."""
    state = request.app.state
    raw = await read_body(request, state.limits.max_body_bytes)
    return await run_in_threadpool(work, raw, state.engines)


def _tokenize(raw: bytes, engines: dict) -> dict:
    req = parse_request(raw, TokenizeRequest, engines)
    engine = engines[req.model]
    with engine.prep_lock:
        if req.messages is not None:
            ids, _ = chat_prompt(req.as_chat(), engine.prep, engine.tool_format)
        else:
            ids = engine.prep.tokenize(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.backend.context_length}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None):
    """vLLM's /tokenizer_info: the tokenizer's special tokens, chat template and context, which
    lm-eval's remote tokenizer reads (with /tokenize and /detokenize) instead of loading one."""
    engines = request.app.state.engines
    backend = engines[served_model(model, engines) if model is not None else next(iter(engines))].backend
    tokenizer = backend.tokenizer
    return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
            "chat_template": getattr(tokenizer, "chat_template", None), "model_max_length": backend.context_length}


@router.post("/detokenize")
async def detokenize(request: Request):
    """vLLM's /detokenize: {"model", "tokens"} -> {"prompt"} (special tokens kept, as given)."""
    return await _off_the_loop(request, _detokenize)


def _detokenize(raw: bytes, engines: dict) -> dict:
    req = parse_request(raw, DetokenizeRequest, engines)
    engine = engines[req.model]
    vocab = engine.backend.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
    with engine.prep_lock:
        return {"prompt": engine.prep.tokenizer.decode(req.tokens)}


@router.get("/v1/models")
async def models(request: Request):
    state = request.app.state
    return {"object": "list", "data": [{"id": k, "object": "model", "created": state.created, "owned_by": state.owner}
                                        for k in state.engines]}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    req, engine, prompt_ids, gen = await _prepared(request, ChatRequest)
    return await respond(request, req, engine, prompt_ids, gen, "chat")


@router.post("/v1/completions")
async def completions(request: Request):
    req, engine, prompt_ids, gen = await _prepared(request, CompletionRequest)
    echo = await run_in_threadpool(_echo_text, req, engine, prompt_ids) if req.echo else None
    return await respond(request, req, engine, prompt_ids, gen, "text", echo=echo)


def _echo_text(req: CompletionRequest, engine: Engine, prompt_ids: list[int]) -> str:
    """The prompt as `echo` repeats it: its text as sent, or its token ids decoded."""
    prompt = single_prompt(req)
    if isinstance(prompt, str):
        return prompt
    with engine.prep_lock:
        return engine.prep.tokenizer.decode(prompt_ids)


async def _prepared(request: Request, model_cls):
    """(request, engine, prompt ids, generation settings): the body read within the size limit,
    then parsed, rendered and tokenized in a worker thread (a megabyte of JSON or a long prompt
    must not stop the event loop), on the engine's own tokenizer copy, never on the tokenizer its
    batch is detokenizing with at the same moment."""
    state = request.app.state
    raw = await read_body(request, state.limits.max_body_bytes)
    return await run_in_threadpool(_prepare, raw, model_cls, state.engines, state.limits)


def _prepare(raw: bytes, model_cls, engines: dict, limits):
    return prepare(parse_request(raw, model_cls, engines, limits), engines, limits)


def prepare(req: RequestBase, engines: dict, limits):
    """A parsed request's engine, prompt ids and generation settings (in a worker thread)."""
    engine = engines[req.model]
    with engine.prep_lock:  # one request at a time on the copy (a Rust tokenizer is not re-entrant)
        prep = engine.prep
        if isinstance(req, ChatRequest):
            prompt_ids, stops = chat_prompt(req, prep, engine.tool_format)
        else:
            prompt_ids, stops = completion_prompt(req, prep), ()
        grammar = output_grammar(req, prep, engine.tool_format)
    return req, engine, prompt_ids, generation_config(req, prep, prompt_ids, stops, limits, grammar)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (not after reading it all)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- answers


@dataclass
class Reply:
    """What every part of one answer shares. kind: "chat" or "text"."""

    kind: str
    model: str
    prompt_ids: list[int]
    include_usage: bool = False
    calls_tools: bool = False  # the reply is parsed for tool calls, in its engine's tool_format
    tool_format: Any = None  # a server/tool_formats module
    logprobs: bool = False
    metrics: ServerMetrics | None = None  # /metrics: its inter-token latencies and token counts
    index: int = 0  # the choice this reply is (n > 1: one Reply per choice, one id)
    id: str = field(init=False, default="")
    created: int = field(default_factory=lambda: int(time.time()))
    # filled while the generation runs
    tokens: int = 0
    reason: str = "eos"
    cached: int = 0
    entries: list = field(default_factory=list)  # Chunk.logprobs not yet answered
    offset: int = 0  # characters of text answered so far (the legacy logprobs' text_offset)
    last: float | None = None  # when the last chunk came (perf_counter)
    echo: str = ""  # the prompt, repeated before the completion (/v1/completions' echo)
    gone: bool = False  # its client hung up while it streamed
    calls: list = field(default_factory=list)  # its tool calls in OpenAI's shape, once read (called)

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]

    def head(self, obj: str) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model, "object": obj}

    def count(self, chunk, generation: Generation) -> None:
        """Count one generated chunk."""
        now = time.perf_counter()
        if self.last is not None and self.metrics is not None:
            self.metrics.itl.labels(self.model).observe(now - self.last)
        self.last = now
        self.cached = generation.cached
        self.tokens += 1
        self.reason = chunk.finish_reason or self.reason
        if chunk.logprobs is not None:
            self.entries.append((chunk.logprobs, self.offset))
        self.offset += len(chunk.text)

    def called(self, calls: list) -> None:
        """The reply's tool calls, once read. A reply that ended at EOS after tool calls finishes
        with "tool_calls" (one cut by a limit keeps its own reason)."""
        self.calls = calls
        if calls and self.reason == "eos":
            self.reason = "tool_calls"

    def take_logprobs(self) -> dict | None:
        """The logprobs object of the tokens counted since the last call, in OpenAI's shape for
        this kind (chat: content entries; completions: the legacy parallel lists)."""
        if not self.logprobs:
            return None
        entries, self.entries = self.entries, []
        if self.kind == "chat":
            return {"content": [{**_token(text, lp), "top_logprobs": [_token(t, v) for t, v in top]}
                                for (text, lp, top), _ in entries]}
        return {"tokens": [text for (text, _, _), _ in entries],
                "token_logprobs": [lp for (_, lp, _), _ in entries],
                # an echoed prompt's first token: nothing predicts it (null, as vLLM answers)
                "top_logprobs": [None if lp is None else {t: v for t, v in top} for (_, lp, top), _ in entries],
                "text_offset": [offset for _, offset in entries]}

    def ended(self) -> None:
        """The generation is over (finished, failed or abandoned): its tokens go to /metrics."""
        if self.metrics is not None:
            self.metrics.ended(self.model, len(self.prompt_ids), self.tokens, self.cached)

    def usage(self) -> dict:
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": self.tokens, "total_tokens": n + self.tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


async def respond(request: Request, req: RequestBase, engine: Engine, prompt_ids: list[int], gen: GenerationConfig,
                  kind: str, echo: str | None = None, answer=None, events=None):
    """kind: "chat" or "text". A JSON answer, or an SSE stream, of req.n choices: each its own
    generation in the engine's batch, with its own seed (seed + i when the request has one), one
    answer whose choices carry their index, streamed interleaved as they come. Each choice takes a
    slot: with n beyond what the engine can hold or queue, the request gets 429 whole (the choices
    already queued are cancelled). `echo`: the prompt's text, repeated before the completion (with
    logprobs, the prompt tokens' own come first). Another API's dialect (messages.py, responses.py:
    one choice) passes its own `answer(reply, generation, first)` and `events(request, reply,
    generation, first)`; OpenAI's are the default."""
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
                _echo(reply, echo, entries)
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
        raise _refusal(e) from None
    if any(g.client_gone for g in generations):
        return gone()
    # The server's own time to first token (queue, tokenizing and prefill included) as a Server-Timing
    # header: browsers show it in their network panel and hand it to pages; the arena page puts it
    # beside the time it measured itself.
    headers = {"Server-Timing": f"ttft;dur={ttft_s * 1000:.1f}"}
    if answer is not None and not req.stream:
        response = await answer(replies[0], generations[0], firsts[0])
    elif not req.stream:
        choices = await asyncio.gather(*(_choice(r, g, f) for r, g, f in zip(replies, generations, firsts)))
        obj = "chat.completion" if kind == "chat" else "text_completion"
        response = gone() if None in choices else JSONResponse(
            {**replies[0].head(obj), "choices": list(choices), "usage": _usage(replies)})
    else:
        if events is not None:
            stream = events(request, replies[0], generations[0], firsts[0])
        else:
            streams = [_choice_events(r, g, f) for r, g, f in zip(replies, generations, firsts)]
            stream = _stream_of(request, replies, streams[0] if len(streams) == 1 else _interleaved(streams))
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    response.headers.update(headers)
    return response


async def _interleaved(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The items of several async iterators as each comes (an error in one ends them all)."""
    queue: asyncio.Queue = asyncio.Queue()
    ended = object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(e)
        finally:
            await queue.put(ended)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is ended:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def _refusal(e: Exception) -> APIError:
    """What a request refused before its first token is answered with."""
    if isinstance(e, QueueFull):
        return APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), type="server_error", code="shutting_down")
    return APIError(400, str(e))


def _echo(reply: Reply, echo: str, entries: list[tuple]) -> None:
    """The echoed prompt goes first: its text, and (with logprobs) its own tokens' entries."""
    reply.echo = echo
    for entry in entries:
        reply.entries.append((entry, reply.offset))
        reply.offset += len(entry[0])
    reply.offset = len(echo)  # the completion's text follows the prompt's


async def _with_first(first, chunks: Generation):
    if first is not None:
        yield first
    async for chunk in chunks:
        yield chunk


async def collected(reply: Reply, chunks: Generation, first) -> str | None:
    """A reply's whole text, every chunk counted (None: its client is gone). A failure before the
    end is the answer's status (400, 503): a JSON answer has not begun. Every dialect's JSON
    answer starts here."""
    text = []
    try:
        async for chunk in _with_first(first, chunks):
            reply.count(chunk, chunks)
            text.append(chunk.text)
    except (UserError, ShuttingDown) as e:
        raise _refusal(e) from None
    finally:
        await chunks.aclose()
        reply.ended()
    if chunks.client_gone:
        return None
    if chunks.request.reason == "max_time":
        reply.reason = "max_time"
    return "".join(text)


def stream_error(request: Request, e: Exception) -> APIError:
    """The error a stream reports once its status line is sent (every dialect's stream ends so)."""
    return _refusal(e) if isinstance(e, (UserError, ShuttingDown)) else internal_error(e, request_id(request))


async def _choice(reply: Reply, chunks: Generation, first) -> dict | None:
    """One choice of a JSON answer, whole (None: its client is gone)."""
    content = await collected(reply, chunks, first)
    if content is None:
        return None
    if reply.kind == "chat":
        message = {"role": "assistant", "content": content}
        if reply.calls_tools:
            message["content"], calls = reply.tool_format.parse(content)
            if calls:
                message["tool_calls"] = calls
            reply.called(calls)
        choice = {"index": reply.index, "message": message, "logprobs": reply.take_logprobs()}
    else:
        choice = {"index": reply.index, "text": reply.echo + content, "logprobs": reply.take_logprobs()}
    choice["finish_reason"] = FINISH[reply.reason]
    return choice


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _event(reply: Reply, delta: str | None, reason: str | None, first: bool = False,
           tool_calls: list | None = None) -> str:
    """One SSE chunk: a chat delta (the first one carries the role; tool-call deltas as OpenAI
    streams them) or a piece of text, with the logprobs of the tokens since the last chunk."""
    if reply.kind == "chat":
        d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
        if tool_calls:
            d["tool_calls"] = tool_calls
        choice = {"index": reply.index, "delta": d, "logprobs": None if first else reply.take_logprobs(),
                  "finish_reason": reason}
    else:
        choice = {"index": reply.index, "text": delta or "", "logprobs": reply.take_logprobs(), "finish_reason": reason}
    out = {**reply.head(_chunk_object(reply)), "choices": [choice]}
    if reply.include_usage:
        out["usage"] = None
    return f"data: {json.dumps(out)}\n\n"


def _tool_call_events(reply: Reply, calls: list[dict]):
    """Each call as OpenAI streams one: its id, type and name with empty arguments, then its arguments."""
    for i, call in enumerate(calls):
        head = {"index": i, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}
        yield _event(reply, None, None, tool_calls=[head])
        yield _event(reply, None, None, tool_calls=[{"index": i, "function": {"arguments": call["function"]["arguments"]}}])


def _chunk_object(reply: Reply) -> str:
    return "chat.completion.chunk" if reply.kind == "chat" else "text_completion"


async def _stream_of(request: Request, replies: list[Reply], choices: AsyncIterator[str]) -> AsyncIterator[str]:
    """The choices' events, then the usage chunk (when asked for) and [DONE]; an error as an event."""
    try:
        async for event in choices:
            yield event
        if any(r.gone for r in replies):
            return
        if replies[0].include_usage:
            last = {**replies[0].head(_chunk_object(replies[0])), "choices": [], "usage": _usage(replies)}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # the status line is sent: report the error in the stream
        yield f"data: {json.dumps(stream_error(request, e).body())}\n\n"


async def _choice_events(reply: Reply, chunks: Generation, first) -> AsyncIterator[str]:
    """One choice's events: its role (chat) or echoed prompt, its deltas, its tool calls, its finish."""
    try:
        if reply.kind == "chat":
            yield _event(reply, None, None, first=True)
        elif reply.echo:
            yield _event(reply, reply.echo, None)  # the prompt (and its logprobs), then the completion
        async for piece in shown(reply, chunks, first):
            yield _event(reply, piece, None)
        if not reply.gone:
            for event in _tool_call_events(reply, reply.calls):
                yield event
            yield _event(reply, None, FINISH[reply.reason])
    finally:
        await chunks.aclose()  # a client gone: stop the engine's stream, free the engine
        reply.ended()


async def shown(reply: Reply, chunks: Generation, first) -> AsyncIterator[str]:
    """A streamed reply's text as it may be shown (where a tool call may begin, its format holds the
    text back), every chunk counted; at its end the tool calls found are in `reply.calls`. Nothing
    more once its client is gone (`reply.gone`). Every dialect's stream reads its reply through this."""
    calls = reply.tool_format.stream() if reply.calls_tools else None
    async for chunk in _with_first(first, chunks):
        reply.count(chunk, chunks)
        piece = calls.push(chunk.text) if calls else chunk.text
        if piece:
            yield piece
    if chunks.client_gone:
        reply.gone = True
        return
    if chunks.request.reason == "max_time":
        reply.reason = "max_time"
    found: list = []
    if calls:
        rest, found = calls.finish()
        if rest:
            yield rest
    reply.called(found)


def _usage(replies: list[Reply]) -> dict:
    """The usage of an answer: its prompt once, every choice's tokens."""
    usage = replies[0].usage()
    completion = sum(r.tokens for r in replies)
    return {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}
