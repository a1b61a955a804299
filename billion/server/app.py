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

Each engine keeps the KV session of its last request (backends.sessions.PromptCache): a request that
continues the previous conversation computes only its new tokens (usage reports them as
`prompt_tokens_details.cached_tokens`).

Bad requests (malformed JSON, unknown model, wrong types, a prompt longer than the context,
n != 1) get OpenAI-style JSON errors {"error": {"message", "type", "param", "code"}} with a 4xx
status; an engine failure is a 500 with the same shape; never a traceback, and the server keeps
serving. The server writes no records (scripts/serve_load.py measures it).

The package: app.py builds the app and its state; schema.py parses and checks requests (and
shapes errors); routes.py holds the route functions and shapes the answers (JSON or SSE);
engine.py runs one generation per engine at a time (lock, worker thread, prompt cache).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from backends.base import Backend
from billion.server import routes
from billion.server.engine import Engine
from billion.server.schema import APIError


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    for engine in {id(e): e for e in app.state.engines.values()}.values():
        engine.executor.shutdown(wait=False, cancel_futures=True)


def create_app(backends: dict[str, Backend], *, name: str = "billion") -> FastAPI:
    """The server for `backends` ({model id: loaded Backend}; several ids may share one Backend,
    e.g. "m" and "m@torch", and then share one Engine: its lock, thread and prompt cache). `name`
    is the model name /v1/models reports as owner."""
    engines: dict[int, Engine] = {}  # by id(backend)
    for backend in backends.values():
        if id(backend) not in engines:
            engines[id(backend)] = Engine(backend)
    app = FastAPI(title="billion", description=__doc__.splitlines()[0], lifespan=_lifespan)
    app.state.engines = {model_id: engines[id(backend)] for model_id, backend in backends.items()}
    app.state.owner = name
    app.state.created = int(time.time())
    app.add_exception_handler(APIError, routes.api_error)
    app.add_exception_handler(Exception, routes.unexpected_error)
    app.include_router(routes.router)
    return app
