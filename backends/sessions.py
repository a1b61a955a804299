"""KV sessions: the abstract session every engine returns, and the batch of one the scheduler
runs a single generation on (SessionBatchCache).

Framework-free: a session is fed token ids and answers numpy logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from backends.batching import OneRowCache


class KVSession(ABC):
    """A model plus its KV cache: feed tokens, read logits, roll back.

    A batch of one (SessionBatchCache, below) and log-likelihood scoring (backends/scoring.py)
    are written once on top of this.
    """

    length: int = 0  # tokens in the cache

    @abstractmethod
    def feed(self, ids: Sequence[int], keep: int = 0) -> np.ndarray:
        """Append `ids` to the cache; return float32 logits [n, vocab] for the
        last `keep` positions (all positions when keep == 0)."""

    @abstractmethod
    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens."""


class SessionBatchCache(OneRowCache):
    """A batch of one on an engine's KV session (its row): what a single generation (Backend.stream)
    runs on, and an engine without a batched KV cache (the llama.cpp peer holds one context) serves
    through, one request at a time. Its verify() is one feed, so every engine speculates in a batch
    of one."""

    def __init__(self, backend):
        self.backend = backend

    def prefill(self, ids, prefix=None):
        session = prefix if prefix is not None else self.backend.session()
        return session, session.feed(list(ids), keep=1)[-1]

    def decode(self, tokens):
        return self.row.feed(list(tokens), keep=1)[-1:]

    def verify(self, rows):
        return [self.row.feed(list(rows[0]), keep=len(rows[0]))]

    def rewind(self, row: int, count: int) -> None:
        if count:
            self.row.crop(self.row.length - count)

    def crop(self, row_cache, length: int):
        row_cache.crop(length)
        return row_cache
