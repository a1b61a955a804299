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
"""

from __future__ import annotations

import time

import torch
from transformers import StaticCache

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
