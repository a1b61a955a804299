"""Who may use the server (billion serve's --api-key, --allowed-origins), checked before any route.

- With API keys, every /v1/* request needs `Authorization: Bearer <key>` (or Anthropic's
  `x-api-key: <key>`); keys are compared in
  constant time (hmac.compare_digest), a missing or wrong one is a 401 in OpenAI's shape.
- Bound to a loopback address, requests whose Host or Origin is not a local name get 403: a web
  page the user visits cannot reach the server through DNS rebinding (a hostile name resolving to
  127.0.0.1) or from its own origin, unless --allowed-origins names that origin ("*": any).
- POST bodies must be application/json (415), which also closes the cross-site form posts that a
  browser sends without asking the server first (no CORS preflight).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import urlparse

from fastapi import Request

from billion.server.errors import APIError

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class Access:
    api_keys: tuple[str, ...] = ()
    local_only: bool = True  # the server listens on a loopback address
    allowed_origins: tuple[str, ...] = ()  # "*": any

    def check(self, request: Request) -> str | None:
        """None, or raises the APIError that answers the request; returns the key it used."""
        if self.local_only and "*" not in self.allowed_origins:
            self._check_names(request)
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise APIError(415, "the request body must be application/json", code="unsupported_media_type")
        if self.api_keys and request.url.path.startswith("/v1/"):
            return self._check_key(request)
        return None

    def _check_names(self, request: Request) -> None:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if host not in LOCAL_NAMES:
            raise APIError(403, f"Host {host!r} is not a local name; this server answers requests to localhost only",
                           type="permission_error", code="forbidden_host")
        origin = request.headers.get("origin")
        if origin and origin not in self.allowed_origins and (urlparse(origin).hostname or "") not in LOCAL_NAMES:
            raise APIError(403, f"requests from {origin} are not allowed (--allowed-origins)",
                           type="permission_error", code="forbidden_origin")

    def _check_key(self, request: Request) -> str:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if "x-api-key" in request.headers:  # Anthropic's header (its SDK, Claude Code)
            scheme, given = "bearer", request.headers["x-api-key"]
        given = given.strip().encode()
        found = None
        for key in self.api_keys:  # every key compared, in constant time each: no early exit to time
            if hmac.compare_digest(given, key.encode()) and scheme.lower() == "bearer":
                found = key
        if found is None:
            raise APIError(401, "a valid API key is needed: Authorization: Bearer <key> (or x-api-key: <key>)",
                           type="invalid_request_error",
                           code="invalid_api_key")
        return found
