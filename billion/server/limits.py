"""What one request may ask for: billion serve's --max-* flags (kept free of the web stack, so the
CLI reads their defaults without importing fastapi)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (billion serve's --max-* flags)."""

    max_body_bytes: int = 8 * 2**20  # 413 past it
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int = 4096  # a request without max_tokens gets the rest of the context, capped here
    max_stops: int = 4  # OpenAI's
    max_stop_length: int = 256  # characters
    max_messages: int = 1024
    request_timeout_s: float = 600.0  # a generation still running then ends with finish_reason "length"
