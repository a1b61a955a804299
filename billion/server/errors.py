"""The errors the server answers with: one type (APIError), in OpenAI's shape
{"error": {"message", "type", "param", "code"}} unless a dialect has its own (dialects/: Anthropic's
Messages answers {"type": "error", "error": {...}}), and the statuses of what goes wrong outside a
request's own fields (a full queue, a shutdown, an engine failure, a client gone)."""

from __future__ import annotations

import logging

from fastapi.responses import Response
from pydantic import ValidationError

from backends.types import UserError
from billion.server.engine import QueueFull, ShuttingDown


RETRY_AFTER_S = 1  # a slot frees up as soon as any request finishes


class APIError(Exception):
    """An error answered with `status`: {"error": {"message", "type", "param", "code"}} (OpenAI's
    shape; a dialect's error_body gives its own)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error(e: BaseException, request_id: str | None = None) -> APIError:
    """An engine failure (or any bug): a 500 in the same shape, with the request's id; the
    exception's class and message stay in the server's log (with the traceback), not in the answer.
    Out of memory (Python's MemoryError, torch's OutOfMemoryError) is a 503 saying so: the request
    may fit later, or shorter."""
    logging.getLogger("billion.server").error("request %s failed", request_id or "?",
                                              exc_info=(type(e), e, e.__traceback__))
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return APIError(503, f"out of memory for this request (request {request_id or '?'}): retry later, or with "
                             f"a shorter prompt or max_tokens", type="server_error", code="out_of_memory")
    return APIError(500, f"internal error (request {request_id or '?'}); the server log has the details",
                    type="server_error")


def validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")  # pydantic's word for our own checks
    return APIError(400, f"{param + ': ' if param else ''}{msg}", param=param,
                    code="invalid_value" if first.get("type") != "missing" else "missing_required_parameter")


def refusal(e: Exception) -> APIError:
    """What a request refused before its first token is answered with."""
    if isinstance(e, QueueFull):
        return APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), type="server_error", code="shutting_down")
    return APIError(400, str(e))


def stream_error(request, e: Exception) -> APIError:
    """The error a stream reports once its status line is sent (every dialect's stream ends so)."""
    return refusal(e) if isinstance(e, (UserError, ShuttingDown)) else internal_error(e, request_id(request))


def request_id(request) -> str | None:
    """The id the server gave this request (app.py's middleware): in the X-Request-ID header of
    every answer, in a 500's message, and in the server log beside the traceback."""
    return getattr(request.state, "request_id", None)


def gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": the answer to no one
