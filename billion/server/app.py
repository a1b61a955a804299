"""An OpenAI-compatible HTTP server over loaded engines: the app (routes, request models, errors).

Engine-agnostic: `create_app({model_id: Backend})` takes backends already loaded (the CLI,
billion/commands/serve.py, loads them; tests pass tiny models). Routes:

- POST /v1/chat/completions: `messages` rendered with the model's chat template (base models:
  the plain "User: …\\nAssistant:" transcript of billion/tasks/chat.py, which also stops there);
- POST /v1/completions: a raw text `prompt` (one string, or a list of one string or of token ids);
- GET /v1/models, GET /health.

Both completion routes stream as server-sent events when `stream` is true (a final usage chunk
with `stream_options.include_usage`), and give `usage` token counts. Request fields:
max_tokens (max_completion_tokens), temperature (default 1, as OpenAI's), top_p, seed, stop,
presence_penalty, frequency_penalty, n (1 only), and the extensions top_k, min_p,
repetition_penalty and ignore_eos (vLLM's names). Sampling semantics are backends/sampling.py's.

Concurrency: requests are queued, not batched. Each engine has one asyncio lock; a request holds
its engine's lock while its generation runs in a worker thread (one thread per engine), so one
generation per engine at a time, in arrival order, while the event loop keeps answering. A
client that disconnects mid-stream stops its generator after the current token, which frees the
engine for the next request.

Each engine keeps the KV session of its last request (backends.base.PromptCache): a request that
continues the previous conversation computes only its new tokens (usage reports them as
`prompt_tokens_details.cached_tokens`).

Bad requests (malformed JSON, unknown model, wrong types, a prompt longer than the context,
n != 1) get OpenAI-style JSON errors {"error": {"message", "type", "param", "code"}} with a 4xx
status; an engine failure is a 500 with the same shape; never a traceback, and the server keeps
serving. The server writes no records (scripts/serve_load.py measures it).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import Backend, PromptCache
from backends.types import Chunk, GenerationConfig, UserError
from billion.tasks.chat import FALLBACK_STOPS, render

# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return APIError(400, f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}", param=param,
                    code="invalid_value" if first.get("type") != "missing" else "missing_required_parameter")


# ---------------------------------------------------------------- request models


class _Request(BaseModel):
    """Fields both routes share. Unknown fields are ignored (clients send many)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # extensions (vLLM's names)
    top_k: int = Field(0, ge=0)  # 0 (or OpenAI-style -1: off)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False


# ---------------------------------------------------------------- engines


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


_DONE = object()


async def generate(engine: Engine, prompt_ids: list[int], gen: GenerationConfig) -> AsyncIterator[Chunk]:
    """The engine's chunks for one request, produced in its worker thread while this request holds
    the engine's lock. Closing this generator early (a client gone) stops the engine's stream after
    its current token; the lock is released only once the thread has let go of the engine."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            cancel.set()

    def work() -> None:
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

    await engine.lock.acquire()
    engine.busy = True
    try:
        future = loop.run_in_executor(engine.executor, work)
    except BaseException:
        engine.busy = False
        engine.lock.release()
        raise

    def release(_):
        engine.busy = False
        engine.lock.release()

    future.add_done_callback(release)
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


# ---------------------------------------------------------------- the app


FINISH = {"eos": "stop", "stop": "stop", "max_tokens": "length"}


def create_app(backends: dict[str, Backend], *, name: str = "billion") -> FastAPI:
    """The server for `backends` ({model id: loaded Backend}; several ids may share one Backend,
    e.g. "m" and "m@torch"). `name` is the model name /v1/models reports as owner."""
    engines: dict[int, Engine] = {}
    by_id: dict[str, Engine] = {}
    for model_id, backend in backends.items():
        if id(backend) not in engines:
            engines[id(backend)] = Engine(backend)
        by_id[model_id] = engines[id(backend)]

    @asynccontextmanager
    async def lifespan(app):
        yield
        for engine in engines.values():
            engine.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="billion", description=__doc__.splitlines()[0], lifespan=lifespan)
    app.state.engines = by_id
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(by_id),
                "busy": sorted({k for k, v in by_id.items() if v.busy})}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": k, "object": "model", "created": created, "owned_by": name}
                                            for k in by_id]}

    async def parse(request: Request, model_cls):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            req = model_cls.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model not in by_id:
            raise APIError(404, f"the model {req.model!r} does not exist; available: {', '.join(by_id)}",
                           param="model", code="model_not_found")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        return req, by_id[req.model]

    def config(req: _Request, engine: Engine, prompt_ids: list[int], extra_stops: tuple = ()) -> GenerationConfig:
        backend = engine.backend
        room = backend.context_length - len(prompt_ids)
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        wanted = req.max_completion_tokens or req.max_tokens
        if room < 1 or (wanted and wanted > room):
            raise APIError(400, f"this model's maximum context length is {backend.context_length} tokens; the "
                                f"prompt has {len(prompt_ids)} tokens"
                                + (f" and {wanted} were asked for the completion" if wanted else ""),
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop", code="invalid_value")
        return GenerationConfig(
            max_tokens=wanted or room, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            ignore_eos=req.ignore_eos, top_k=max(req.top_k, 0), min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, stop=tuple(stops) + extra_stops)

    def usage(prompt_ids, tokens: int, cached: int) -> dict:
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": tokens,
                "total_tokens": len(prompt_ids) + tokens, "prompt_tokens_details": {"cached_tokens": cached}}

    async def respond(request: Request, req: _Request, engine: Engine, prompt_ids: list[int], gen: GenerationConfig,
                      kind: str):
        """kind: "chat" or "text". A JSON answer, or an SSE stream."""
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        base = {"id": rid, "created": int(time.time()), "model": req.model}
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not req.stream:
            text, tokens, reason, cached = [], 0, "eos", 0
            chunks = generate(engine, prompt_ids, gen)
            try:
                async for chunk in chunks:
                    if not tokens:  # read while this request holds the engine
                        cached = engine.cache.reused
                    text.append(chunk.text)
                    tokens += 1
                    reason = chunk.finish_reason or reason
                    if await request.is_disconnected():  # nobody will read the answer: free the engine
                        break
            except UserError as e:
                raise APIError(400, str(e)) from None
            finally:
                await chunks.aclose()
            content = "".join(text)
            choice = ({"index": 0, "message": {"role": "assistant", "content": content}} if kind == "chat"
                      else {"index": 0, "text": content, "logprobs": None})
            choice["finish_reason"] = FINISH[reason]
            return JSONResponse({**base, "object": obj, "choices": [choice],
                                 "usage": usage(prompt_ids, tokens, cached)})

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def event(delta: str | None, reason: str | None, first: bool = False) -> str:
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            out = {**base, "object": obj, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return f"data: {json.dumps(out)}\n\n"

        chunks = generate(engine, prompt_ids, gen)

        async def events():
            tokens, reason, cached = 0, "eos", 0
            try:
                if kind == "chat":
                    yield event(None, None, first=True)
                async for chunk in chunks:
                    if not tokens:
                        cached = engine.cache.reused
                    tokens += 1
                    reason = chunk.finish_reason or reason
                    if chunk.text:
                        yield event(chunk.text, None)
                    # Starlette notices a client gone on its own too; this check does not depend on how
                    # the ASGI server reports it
                    if await request.is_disconnected():
                        return
                yield event(None, FINISH[reason])
                if include_usage:
                    last = {**base, "object": obj, "choices": [], "usage": usage(prompt_ids, tokens, cached)}
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as e:  # the status line is sent: report the error in the stream
                err = APIError(400, str(e)) if isinstance(e, UserError) else \
                    APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                await chunks.aclose()  # a client gone: stop the engine's stream, free the engine

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req, engine = await parse(request, ChatRequest)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt_ids = render(engine.backend, messages)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        stops = () if engine.backend.has_chat_template else FALLBACK_STOPS
        gen = config(req, engine, prompt_ids, stops)
        return await respond(request, req, engine, prompt_ids, gen, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, engine = await parse(request, CompletionRequest)
        prompt: Any = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt",
                               code="unsupported_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = engine.backend.tokenize(prompt)
        else:
            prompt_ids = list(prompt)
            if any(not 0 <= t < engine.backend.vocab_size for t in prompt_ids):
                raise APIError(400, f"token ids must be in [0, {engine.backend.vocab_size})", param="prompt",
                               code="invalid_value")
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_value")
        gen = config(req, engine, prompt_ids)
        return await respond(request, req, engine, prompt_ids, gen, "text")

    return app
