"""Test doubles shared by several test files: engines that need no weights."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from backends.batching import BatchCache, BatchGenerator
from backends.sessions import SessionBatchCache


class FixedLogits:
    """A stand-in engine whose next-token logits never change: its output tokens are i.i.d."""

    eos_ids = frozenset()

    def __init__(self, logits):
        self.row, self.vocab_size = np.asarray(logits, dtype=np.float32), len(logits)

    def check_fits(self, *_):
        pass

    def session(self):
        engine = self

        class Session:
            length = 0

            def feed(self, ids, keep=0):
                self.length += len(ids)
                return np.tile(engine.row, (keep or len(ids), 1))

            def crop(self, length):
                self.length = min(self.length, length)

        return Session()


class FixedBatch(BatchCache):
    """A batched KV cache whose logits never change: `row` for every row."""

    def __init__(self, row):
        self.row, self.rows = np.asarray(row, dtype=np.float32), 0

    def prefill(self, ids, prefix=None):
        return None, self.row

    def add(self, row):
        self.rows += 1

    def decode(self, tokens):
        return np.tile(self.row, (len(tokens), 1))

    def keep(self, rows):
        self.rows = len(rows)

    def extract(self, row):
        return None

    def crop(self, row_cache, length):
        return None


def scheduled(engine, prompt, gen, draft=None, num_draft: int = 3, stats=None) -> Iterator[tuple[int, bool]]:
    """(token, from_draft) of one generation by the one scheduler on a double's session (a batch of
    one, as Backend.stream runs it), EOS included."""
    grammars = getattr(engine, "grammars", None)
    batch = BatchGenerator(SessionBatchCache(engine), engine.eos_ids, max_batch=1, prompt_cache_size=0, draft=draft,
                           num_draft=num_draft, vocab_size=engine.vocab_size, stats=stats,
                           constrain=grammars.matcher if grammars is not None else None)
    batch.add(prompt, gen)
    while batch.busy:
        for e in batch.step():
            if e.token is not None:
                yield e.token, e.from_draft
