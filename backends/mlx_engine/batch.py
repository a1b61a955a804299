"""The MLX engine's batched KV cache (backends/batching.py's BatchCache) on mlx-lm's own batch cache.

mlx-lm's `BatchKVCache` (mlx_lm/models/cache.py) keeps rows left-padded with per-row offsets, so
RoPE positions and the causal mask are right for every row; `merge`, `extend`, `filter` and
`extract` are exactly the join/leave operations continuous batching needs, and mlx-lm's own
`BatchGenerator` is built on them. billion drives the cache itself rather than through
`BatchGenerator` because BatchGenerator samples by itself (its samplers see log-probabilities
after its processors, from the global `mx.random` state: mlx_lm.server turns batching off when a
request has a seed); with the cache alone, billion's one sampling rule runs on each row's logits
with the request's own seed, the same on both engines.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from backends.batching import BatchCache


class MLXBatchCache(BatchCache):
    # no verify(): speculative decoding inside a batch needs each row to forget its own number of
    # rejected proposals, and BatchKVCache cannot (see cannot_verify)
    cannot_verify = ("mlx-lm's BatchKVCache has one write position for every row and masks only each "
                     "row's left padding, so rows cannot forget different numbers of rejected drafts")

    def __init__(self, backend):
        self.model = backend.model
        self.layers: list[BatchKVCache] | None = None

    def prefill(self, ids, prefix=None):
        cache = prefix if prefix is not None else make_prompt_cache(self.model)
        logits = self.model(mx.array([list(ids)]), cache=cache)[0, -1]
        return cache, np.array(logits.astype(mx.float32))

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
