"""An HTTP server over loaded engines (OpenAI's and Anthropic's APIs, the arena page): the app.

Engine-agnostic: `create_app({model_id: Backend})` takes backends already loaded (the CLI,
billion/commands/serve.py, loads them; tests pass tiny models). Routes:

- POST /v1/chat/completions: `messages` rendered with the model's chat template (base models:
  the plain "User: …\\nAssistant:" transcript of billion/tasks/chat.py, which also stops there);
- POST /v1/completions: a raw text `prompt` (one string, or a list of one string or of token ids,
  or a list of one list of ids); `echo` (with `logprobs`, the prompt's own, for lm-eval);
- POST /v1/responses: OpenAI's Responses API (dialects/responses.py), a translation onto the chat
  route's request and generation;
- POST /v1/messages, POST /v1/messages/count_tokens: Anthropic's Messages API (dialects/messages.py),
  the same kind of translation;
- GET /v1/models, GET /health, GET /metrics (Prometheus' text format: metrics.py);
- POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's shapes, which lm-eval's remote
  tokenizer reads): a prompt or messages to token ids and back;
- GET /: the arena, a chat page where every served engine answers in its own column (static files
  in billion/server/page/, nothing fetched from elsewhere); GET /report: the records of
  `--results DIR` as billion report --html renders them (404 without a folder).

Both completion routes stream as server-sent events when `stream` is true (a final usage chunk
with `stream_options.include_usage`), and give `usage` token counts. Request fields:
max_tokens (max_completion_tokens), temperature (default 1, as OpenAI's), top_p, seed, stop,
presence_penalty, frequency_penalty, n (choices decoded together, up to 16), and the extensions
top_k, min_p, repetition_penalty and ignore_eos (vLLM's names). Sampling semantics are
backends/sampling.py's.

Concurrency: continuous batching (engine.py). Each engine decodes up to `parallel` requests
together in one worker thread (backends/batching.py); more wait in a queue of `queue_size`, and
beyond that a request gets 429 with Retry-After. A request arriving mid-batch joins at the next
step; a client that disconnects (queued, prefilling or decoding; streamed or not) leaves at the
next step. The engine's
prompt cache holds the KV rows of its last finished requests: a request that continues an
earlier conversation computes only its new tokens (`usage.prompt_tokens_details.cached_tokens`).
The prompt cache is shared by every client of the engine.

Bad requests (malformed JSON, unknown model, wrong types or out-of-range values, a prompt longer
than the context, n above 16, fields billion does not implement: requests.UNSUPPORTED) get
OpenAI-style JSON errors {"error": {"message", "type", "param", "code"}} (Anthropic's shape on
/v1/messages) with a 4xx status; an engine failure is a 500 with the same shape naming the request's id
(X-Request-ID on every answer), its traceback in the server log; never a traceback in an answer.
A failure in one request's work fails that request alone; /health is 503 once an engine's worker
has died (the CLI then shuts the server down). The server writes no records (`billion load` measures it).

The package, a request's way through it: app.py builds the app and its state (access.py: API keys
and local names; limits.py); a dialect's module (dialects/: openai, responses, messages) parses
its body into the request the server runs (requests.py: the request models and their checks;
errors.py: the one error type and the statuses), prompts.py renders and tokenizes it and builds
its grammar (in the engine's tool format, tool_formats/) and GenerationConfig; answers.py runs its
generations on the engine (engine.py: each engine's batch in its worker thread, each request's
chunks) and hands their chunks back to the dialect to render. routes.py holds the routes that are
no dialect (health, the page, metrics, tokenize). A fifth dialect is one new module in dialects/.
"""

from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders

from backends.base import Backend
from billion.server import dialects, routes
from billion.server.access import Access
from billion.server.engine import Engine
from billion.server.errors import APIError, internal_error, request_id
from billion.server.limits import Limits
from billion.server.metrics import ServerMetrics


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return dialects.error_response(e, request.url.path)


async def _unexpected_error(request: Request, e: Exception) -> JSONResponse:
    # this handler runs outside the middleware that sets the header (and counts the answer) on every other one
    response = dialects.error_response(internal_error(e, request_id(request)), request.url.path)
    response.headers["X-Request-ID"] = request_id(request) or ""
    request.app.state.metrics.answered(request.url.path, response.status_code)
    return response


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    for engine in {id(e): e for e in app.state.engines.values()}.values():
        engine.close()


class RequestIds:
    """Every request gets an id, answered as X-Request-ID (a client quotes it; the log has it); then
    access.py's checks (API key, local names, JSON bodies) answer before any route runs.

    A plain ASGI middleware, not Starlette's BaseHTTPMiddleware (`app.middleware("http")`): that one
    hands the routes a `receive` wrapped in a task group, through which a client's disconnect is
    lost (`Request.is_disconnected()` stays False), so abandoned non-streaming requests ran on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrived"] = time.perf_counter()  # the start of the server's own time to first token

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
                scope["app"].state.metrics.answered(scope["path"], message["status"])
            await send(message)

        try:
            state["api_key"] = scope["app"].state.access.check(Request(scope))
        except APIError as e:
            return await dialects.error_response(e, scope["path"])(scope, receive, send_with_id)
        await self.app(scope, receive, send_with_id)


def create_app(backends: dict[str, Backend], *, name: str = "billion", parallel: int = 8, queue_size: int = 64,
               limits: Limits = Limits(), access: Access = Access(), draft=None, num_draft: int = 4,
               prefill_chunk: int | None = None, results: str | None = None, tool_format: str = "auto") -> FastAPI:
    """The server for `backends` ({model id: loaded Backend}; several ids may share one Backend,
    e.g. "m" and "m@torch", and then share one Engine: its batch, worker thread and prompt cache).
    `name` is the model name /v1/models reports as owner; each engine decodes up to `parallel`
    requests together and queues `queue_size` more, prefilling at most `prefill_chunk` prompt tokens
    per step (None: each prompt whole). `results`: the records folder /report shows (None: no report).
    `tool_format`: how the models call tools (tool_formats.FORMATS), or "auto" (each from its template)."""
    engines: dict[int, Engine] = {}  # by id(backend)
    for backend in backends.values():
        if id(backend) not in engines:
            engines[id(backend)] = Engine(backend, parallel, queue_size, limits.request_timeout_s, draft, num_draft,
                                          prefill_chunk, tool_format)
    app = FastAPI(title="billion", description=__doc__.splitlines()[0], lifespan=_lifespan)
    app.state.engines = {model_id: engines[id(backend)] for model_id, backend in backends.items()}
    app.state.owner = name
    app.state.limits, app.state.access = limits, access
    app.state.drain = lambda: [engine.drain() for engine in engines.values()]  # shutdown begins
    # why an engine's worker died (None while all run): the server then shuts down
    app.state.failure = lambda: next((e.failure for e in engines.values() if e.failure), None)
    app.state.created = int(time.time())
    app.state.results = results
    app.add_middleware(RequestIds)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected_error)
    routers = (routes.router, *(dialect.router for dialect in dialects.ALL))
    for router in routers:
        app.include_router(router)
    page = "/page"  # the arena's files (page/index.html links them there)
    app.mount(page, StaticFiles(directory=routes.PAGE), name="page")
    app.state.metrics = ServerMetrics(app.state.engines, [r.path for router in routers for r in router.routes], [page])
    return app
