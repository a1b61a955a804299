"""The APIs the server speaks, one module each: openai (Chat Completions and Completions), responses
(OpenAI's Responses) and messages (Anthropic's Messages). Each is a translation: its request parsed
into the request the server runs (requests.py, prompts.py), and the one stream of generation
chunks (answers.py) rendered into its JSON and SSE shapes. No generation, grammar or tool logic
lives in a dialect.

Adding a dialect is adding a module here: the app includes every module's `router`, and a module
with `ERROR_PREFIX` and `error_body(APIError) -> dict` answers the errors of paths under that
prefix in its own shape (others get OpenAI's)."""

from __future__ import annotations

import importlib
import pkgutil

from fastapi.responses import JSONResponse

from billion.server.errors import APIError

ALL = tuple(importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__))


def error_response(e: APIError, path: str) -> JSONResponse:
    """The answer to a request for `path` that failed with `e`: in its dialect's error shape."""
    shaped = next((d for d in ALL if hasattr(d, "error_body") and path.startswith(d.ERROR_PREFIX)), None)
    body = shaped.error_body(e) if shaped else e.body()
    return JSONResponse(body, status_code=e.status, headers=e.headers)
