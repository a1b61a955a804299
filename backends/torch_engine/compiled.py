"""A compiled decode step on a static KV cache: gpt-fast's way to take Python and op dispatch out
of decoding (`--compile`, torch only).

Eager decoding runs each layer's dozen small ops one by one through Python and the dispatcher, and
grows its KV cache by concatenation. Here the cache is a transformers StaticCache of fixed shape
(its length rounded up to a power of two, so that a few shapes cover every request), the prompt is
prefilled into it eagerly, and every later token goes through one `torch.compile`d single-token
forward pass: inductor fuses the elementwise work between the matmuls into a few kernels, and on
CUDA "reduce-overhead" replays the step as a CUDA graph. The first step at each cache length
compiles (minutes on a small CPU; inductor's on-disk cache makes a later process quicker); the
tokens are the eager path's (tested).

The scheduler reaches it through CompiledBatchCache, the batch of one a single generation runs on
(Backend.stream) when the model was loaded with compile=True: prefill, speculative verification
and rewinding are eager on the same static cache; each decode step is the compiled one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import StaticCache

from backends.batching import OneRowCache
from backends.types import UserError

SMALLEST_CACHE = 256
# "inductor" generates fused kernels; the tests swap in "eager" (dynamo's graph capture only) to
# check this file's cache and position logic without minutes of C++ compilation.
COMPILER = "inductor"


class CompiledDecode:
    def __init__(self, model, device: str, context_length: int):
        self.model = model
        self.cuda = device.startswith("cuda")
        self.cuda_graphs = self.cuda and COMPILER == "inductor"
        self.context_length = context_length
        self.step = torch.compile(self._step, backend=COMPILER, fullgraph=True, dynamic=False,
                                  mode="reduce-overhead" if self.cuda_graphs else None)
        self.compile_seconds: dict[int, float] = {}  # cache length -> what its first step took

    def _step(self, token: torch.Tensor, position: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        return self.model(input_ids=token, position_ids=position, cache=cache, use_cache=True).logits[:, -1, :]

    def cache_length(self, tokens: int) -> int:
        return min(max(SMALLEST_CACHE, 1 << (tokens - 1).bit_length()), max(self.context_length, tokens))

    def new_cache(self, tokens: int) -> StaticCache:
        """A static cache with room for `tokens` (prompt plus new tokens)."""
        return StaticCache(config=self.model.config, max_cache_len=self.cache_length(tokens))

    def __call__(self, token: torch.Tensor, position: int, cache: StaticCache) -> torch.Tensor:
        """Logits [1, vocab] of one token at `position`, its keys and values written into `cache`."""
        pos = torch.tensor([[position]], device=token.device)
        length = cache.get_max_length()
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
        if length in self.compile_seconds:
            return self.step(token, pos, cache)
        start = time.perf_counter()
        try:
            logits = self.step(token, pos, cache)
        except Exception as e:  # dynamo/inductor raise many types; name the model, not a traceback
            arch = (self.model.config.architectures or [self.model.config.model_type])[0]
            raise UserError(f"torch.compile could not compile {arch}'s decode step "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"run without --compile") from None
        if self.cuda:
            torch.cuda.synchronize()
        self.compile_seconds[length] = time.perf_counter() - start
        return logits

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        how = f"torch.compile ({COMPILER}{graphs}) decode step on a static KV cache"
        if not self.compile_seconds:
            return how + ", compiled at the first generation"
        return how + ", compiled in " + ", ".join(f"{s:.1f} s (cache {n})" for n, s in
                                                 sorted(self.compile_seconds.items()))


@dataclass
class _Row:
    cache: StaticCache
    length: int = 0  # tokens it holds (kept here: reading the cache's own counter would sync the device)

    @property
    def capacity(self) -> int:
        return self.cache.get_max_length()


class CompiledBatchCache(OneRowCache):
    """A batch of one on the compiled step's static cache (backends/batching.py's OneRowCache)."""

    def __init__(self, backend):
        self.model, self.device, self.step = backend.model, backend.device, backend.compiled
        self.room = 1  # tokens the next row will hold at most (expect)

    def expect(self, prompt_tokens: int, gen) -> None:
        self.room = prompt_tokens + gen.max_tokens

    @torch.inference_mode()
    def _forward(self, row: _Row, ids, keep: int) -> torch.Tensor:
        positions = torch.arange(row.length, row.length + len(ids), device=self.device)[None]
        logits = self.model(input_ids=torch.tensor([list(ids)], device=self.device), position_ids=positions,
                            cache=row.cache, use_cache=True, logits_to_keep=keep).logits[0]
        row.length += len(ids)
        return logits.float().cpu()

    def prefill(self, ids, prefix=None):
        row = prefix if prefix is not None else _Row(self.step.new_cache(self.room))
        return row, self._forward(row, ids, 1)[-1].numpy()

    @torch.inference_mode()
    def decode(self, tokens):
        token = torch.tensor([[tokens[0]]], device=self.device)
        logits = self.step(token, self.row.length, self.row.cache)
        self.row.length += 1
        return logits.float().cpu().numpy()

    def verify(self, rows):
        return [self._forward(self.row, rows[0], len(rows[0])).numpy()]

    def rewind(self, row: int, count: int) -> None:
        if count:
            self._set_length(self.row, self.row.length - count)

    @torch.inference_mode()
    def crop(self, row_cache: _Row, length: int) -> _Row:
        if row_cache.capacity >= self.room:
            self._set_length(row_cache, length)
            return row_cache
        # the next request needs more room than this row's cache has: its tokens move to a bigger one
        bigger = _Row(self.step.new_cache(self.room), length)
        for i, layer in enumerate(row_cache.cache.layers):
            bigger.cache.update(layer.keys[:, :, :length], layer.values[:, :, :length], i)
        return bigger

    @staticmethod
    def _set_length(row: _Row, length: int) -> None:
        # what the next write overwrites: positions past it are hidden by the causal mask until then
        for layer in row.cache.layers:
            layer.cumulative_length.fill_(length)
        row.length = length
