"""The one timed stream: every command that times generation (bench, speculate, chat, serve) reads
its figures here, so time to first token and decode rate mean the same everywhere.

Timestamps are the chunks' own (taken by the engine after the device computed each token); the
clock starts when the TimedStream is made, just before the stream's first token is asked for, so
time to first token covers prefill and the first sample.
"""

from __future__ import annotations

import time
from typing import Iterator

from backends.types import Chunk


def decode_rate(times: list[float]) -> float:
    """Tokens per second after the first token (the first one carries the prefill); NaN for one token."""
    if len(times) < 2 or times[-1] <= times[0]:
        return float("nan")
    return (len(times) - 1) / (times[-1] - times[0])


class TimedStream:
    """Iterate it as the chunks it wraps; afterwards it holds the tokens, their times, how many
    came from a draft and why generation stopped ("eos", "max_tokens"; "interrupted" when the
    consumer stopped early, "error" when the engine raised)."""

    def __init__(self, chunks: Iterator[Chunk]):
        self.start = time.perf_counter()
        self._chunks = chunks
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.from_draft = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for chunk in self._chunks:
                self.times.append(chunk.time_s)
                self.tokens.append(chunk.token)
                self.from_draft += chunk.from_draft
                self.finish_reason = chunk.finish_reason
                yield chunk
            self.finish_reason = self.finish_reason or "eos"
        except BaseException as e:  # Ctrl-C, the consumer closing us early, or an engine error
            self.finish_reason = "interrupted" if isinstance(e, (KeyboardInterrupt, GeneratorExit)) else "error"
            raise
        finally:
            close = getattr(self._chunks, "close", None)
            if close:
                close()

    def consume(self) -> "TimedStream":
        for _ in self:
            pass
        return self

    @property
    def ttft_s(self) -> float | None:
        return self.times[0] - self.start if self.times else None

    @property
    def decode_tps(self) -> float:
        return decode_rate(self.times)
