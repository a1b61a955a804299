"""The MLX engine's caches for the one scheduler (backends/batching.py's BatchCache): a batch of
many on mlx-lm's own batch cache (MLXBatchCache), a batch of one on its KV cache (MLXOneRowCache).

mlx-lm's `BatchKVCache` (mlx_lm/models/cache.py) keeps rows left-padded with per-row offsets, so
RoPE positions and the causal mask are right for every row; `merge`, `extend`, `filter` and
`extract` are exactly the join/leave operations continuous batching needs, and mlx-lm's own
`BatchGenerator` is built on them. billion drives the cache itself rather than through
`BatchGenerator` because BatchGenerator samples by itself (its samplers see log-probabilities
after its processors, from the global `mx.random` state: mlx_lm.server turns batching off when a
request has a seed); with the cache alone, billion's one sampling rule runs on each row's logits
with the request's own seed, the same on both engines.

A batch of one keeps what made mlx-lm's own `generate_step` fast (MLXOneRowCache): on Metal the
GPU must not wait for the host. generate_step samples on the device, builds the next step's graph
and `mx.async_eval`s it before the host reads the token. The scheduler samples on the host
(billion's one rule, numpy), so for a request whose rule is the argmax of the raw logits (greedy,
no grammar, no penalty) this cache launches step n+1 on the device's own argmax of step n before
handing step n's logits to the host: the host's rule then picks the same token and the next
decode() finds its step already under way. Where the host picks another token (a tie broken the
other way), the guess is trimmed and the chosen token fed: the tokens are the rule's, always.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache, trim_prompt_cache

from backends.batching import BatchCache, OneRowCache
from backends.sampling import uses_history


def forward(model, cache, ids: Sequence[int], keep: int) -> mx.array:
    """Logits [keep, vocab] of the last `keep` positions after feeding `ids` (all with keep 0).
    The positions before them run without their output head, as in mlx-lm's prefill: their
    logits are never evaluated, so the vocabulary projection of a long prompt is not computed."""
    ids = list(ids)
    if 0 < keep < len(ids):
        model(mx.array([ids[:-keep]]), cache=cache)
        mx.eval([c.state for c in cache])
        ids = ids[-keep:]
    return model(mx.array([ids]), cache=cache)[0]


def to_numpy(logits: mx.array) -> np.ndarray:
    return np.array(logits.astype(mx.float32))


def prefill(model, ids: Sequence[int], prefix=None) -> tuple[list, np.ndarray]:
    """BatchCache.prefill on mlx-lm's per-layer KV caches (a new one, or `prefix`, extended)."""
    cache = prefix if prefix is not None else make_prompt_cache(model)
    return cache, to_numpy(forward(model, cache, ids, 1)[-1])


class MLXBatchCache(BatchCache):
    # no verify(): speculative decoding inside a batch needs each row to forget its own number of
    # rejected proposals, and BatchKVCache cannot (see cannot_verify)
    cannot_verify = ("mlx-lm's BatchKVCache has one write position for every row and masks only each "
                     "row's left padding, so rows cannot forget different numbers of rejected drafts")

    def __init__(self, backend):
        self.model = backend.model
        self.layers: list[BatchKVCache] | None = None

    def prefill(self, ids, prefix=None):
        return prefill(self.model, ids, prefix)

    def add(self, row: list) -> None:
        joined = [BatchKVCache.merge([layer]) for layer in row]
        if self.layers is None:
            self.layers = joined
        else:
            for mine, theirs in zip(self.layers, joined):
                mine.extend(theirs)

    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        logits = self.model(mx.array(list(tokens))[:, None], cache=self.layers)[:, -1]
        return np.array(logits.astype(mx.float32))

    def keep(self, rows: Sequence[int]) -> None:
        if not rows:
            self.layers = None
            return
        index = mx.array(list(rows))
        for layer in self.layers:
            layer.filter(index)

    def extract(self, row: int) -> list:
        return [layer.extract(row) for layer in self.layers]

    def crop(self, row_cache: list, length: int) -> list:
        out = []
        for layer in row_cache:
            copy = KVCache()
            copy.keys = mx.contiguous(layer.keys[..., :length, :])
            copy.values = mx.contiguous(layer.values[..., :length, :])
            copy.offset = length
            out.append(copy)
        return out


class MLXOneRowCache(OneRowCache):
    """A batch of one on mlx-lm's KV cache, running ahead on the device's argmax (module docstring)."""

    def __init__(self, backend):
        self.model = backend.model
        self.guess = False  # the row's rule is the argmax of the raw logits: worth running ahead
        self.left = 0  # decode steps the row may still take (the last one is never run ahead)
        self.ahead: tuple | None = None  # (the device's guessed token, its step's logits), launched

    def expect(self, prompt_tokens: int, gen) -> None:
        self.guess = gen.temperature == 0 and gen.grammar is None and not uses_history(gen)
        self.left = gen.max_tokens - 1

    def _settle(self) -> None:
        """Forget a step run ahead (its guessed token's keys and values)."""
        if self.ahead is not None:
            trim_prompt_cache(self.row, 1)
            self.ahead = None

    def prefill(self, ids, prefix=None):
        return prefill(self.model, ids, prefix)

    def add(self, row: list) -> None:
        super().add(row)
        self.ahead = None

    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        token = tokens[0]
        if self.ahead is not None and self.ahead[0].item() == token:
            logits = self.ahead[1]  # computed, or being computed, since the last call
            self.ahead = None
        else:
            self._settle()
            logits = self.model(mx.array([[token]]), cache=self.row)[0, -1]
        self.left -= 1
        if not (self.guess and self.left > 0):
            return to_numpy(logits)[None]
        # what the host reads is queued before the step run ahead (a stream runs in order), so the
        # host waits for step n only, and samples while the device runs step n+1
        host, guess = logits.astype(mx.float32), mx.argmax(logits)
        mx.async_eval(host, guess)
        after = self.model(guess.reshape(1, 1), cache=self.row)[0, -1]
        mx.async_eval(after)
        self.ahead = (guess, after)
        return np.array(host)[None]

    def verify(self, rows):
        self._settle()
        return [to_numpy(forward(self.model, self.row, rows[0], 0))]

    def rewind(self, row: int, count: int) -> None:
        if count:
            trim_prompt_cache(self.row, count)

    def keep(self, rows: Sequence[int]) -> None:
        if not rows:
            self.ahead = None
        super().keep(rows)

    def extract(self, row: int) -> list:
        self._settle()
        return super().extract(row)

    def crop(self, row_cache: list, length: int) -> list:
        trim_prompt_cache(row_cache, row_cache[0].offset - length)
        return row_cache
