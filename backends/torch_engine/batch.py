"""The torch engine's batched KV cache (backends/batching.py's BatchCache) on transformers' DynamicCache.

Why not transformers' own continuous batching (`init_continuous_batching`, 5.25): it samples by
itself with only temperature, top-k and top-p per request and one global seed, and gives no
per-request logits processors, penalties or stop strings, so billion's one sampling rule could not
run inside it, and a seeded request's tokens would depend on its neighbours. This is the plain
alternative it leaves: rows left-padded to a common length in one DynamicCache, a 2-D attention
mask that hides the padding, and explicit position ids per row. Checked against generation alone
(tests/test_batching.py); it runs wherever the model runs (CPU, MPS, CUDA).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from backends.batching import BatchCache


class TorchBatchCache(BatchCache):
    def __init__(self, backend):
        self.model, self.device = backend.model, backend.device
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, length]: 1 for a real token, 0 for padding
        self.positions: torch.Tensor | None = None  # [rows]: each row's next position

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def prefill(self, ids, prefix=None):
        cache = prefix if prefix is not None else self._new_cache()
        inp = torch.tensor([list(ids)], device=self.device)
        logits = self.model(input_ids=inp, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        return cache, logits.float().cpu().numpy()

    @torch.inference_mode()
    def prefill_many(self, prompts):
        # left-padded to one length, the padding masked and each row's positions counted from its
        # first real token: the same keys, values and last logits as prefilling each alone
        width = max(len(ids) for ids in prompts)
        inp = torch.tensor([[0] * (width - len(ids)) + list(ids) for ids in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=self.device)
        cache = self._new_cache()
        logits = self.model(input_ids=inp, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float().cpu().numpy()
        rows = [self._row_cache([(layer.keys[i:i + 1, :, width - len(ids):], layer.values[i:i + 1, :, width - len(ids):])
                                 for layer in cache.layers]) for i, ids in enumerate(prompts)]
        return list(zip(rows, logits))

    def add(self, row: DynamicCache) -> None:
        length = row.get_seq_length()
        if self.cache is None:
            self.cache = row
            self.mask = torch.ones(1, length, dtype=torch.long, device=self.device)
            self.positions = torch.tensor([length], device=self.device)
            return
        width = max(self.mask.shape[1], length)
        self._pad_to(width)
        for mine, theirs in zip(self.cache.layers, row.layers):
            mine.keys = torch.cat([mine.keys, _left_pad(theirs.keys, width)])
            mine.values = torch.cat([mine.values, _left_pad(theirs.values, width)])
        row_mask = torch.zeros(1, width, dtype=torch.long, device=self.device)
        row_mask[:, width - length:] = 1
        self.mask = torch.cat([self.mask, row_mask])
        self.positions = torch.cat([self.positions, torch.tensor([length], device=self.device)])

    def _pad_to(self, width: int) -> None:
        if self.mask.shape[1] == width:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = _left_pad(layer.keys, width), _left_pad(layer.values, width)
        self.mask = _left_pad(self.mask, width, dim=1)

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        inp = torch.tensor(list(tokens), device=self.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model(input_ids=inp, attention_mask=self.mask, position_ids=self.positions[:, None],
                         cache=self.cache, use_cache=True)
        self.positions = self.positions + 1
        return out.logits[:, -1].float().cpu().numpy()

    @torch.inference_mode()
    def verify(self, rows):
        # Rows shorter than the longest are padded with masked columns; a rejected proposal is
        # masked afterwards (rewind), a hole the attention skips, so no row's cache is moved.
        width = max(len(r) for r in rows)
        inp = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        steps = torch.arange(width, device=self.device)
        new = (steps[None, :] < lengths[:, None]).long()
        self._verified = (self.mask.shape[1], [len(r) for r in rows])  # where rewind finds them
        self.mask = torch.cat([self.mask, new], dim=1)
        out = self.model(input_ids=inp, attention_mask=self.mask, position_ids=self.positions[:, None] + steps,
                         cache=self.cache, use_cache=True)
        self.positions = self.positions + lengths
        logits = out.logits.float().cpu().numpy()
        return [logits[i, :len(r)] for i, r in enumerate(rows)]

    @torch.inference_mode()
    def rewind(self, row: int, count: int) -> None:
        if count:
            start, lengths = self._verified
            end = start + lengths[row]
            self.mask[row, end - count:end] = 0
            self.positions[row] -= count

    def keep(self, rows: Sequence[int]) -> None:
        if not rows:
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(list(rows), device=self.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        # columns that are padding in every remaining row are dead weight: cut them
        first = int(self.mask.any(dim=0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        self.mask = self.mask[:, first:]

    def extract(self, row: int) -> DynamicCache:
        real = self.mask[row].bool()  # left padding, and the holes of rejected proposals
        return self._row_cache([(layer.keys[row:row + 1, :, real], layer.values[row:row + 1, :, real])
                                for layer in self.cache.layers])

    def crop(self, row_cache: DynamicCache, length: int) -> DynamicCache:
        return self._row_cache([(layer.keys[:, :, :length], layer.values[:, :, :length])
                                for layer in row_cache.layers])

    def _row_cache(self, tensors) -> DynamicCache:
        cache = self._new_cache()
        for i, (k, v) in enumerate(tensors):
            cache.update(k.clone(), v.clone(), i)
        return cache


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
