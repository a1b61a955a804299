"""The engine interface: the whole contract between billion and an engine.

Nothing here imports mlx or torch: what crosses the boundary is ints, lists of ints, floats, str,
numpy arrays (logits) and the frozen dataclasses of backends/types.py. The shared algorithms live
in batching.py (the one scheduler every token comes from), sessions.py (KV sessions),
text_stream.py (tokens to text), scoring.py (lm-eval log-likelihoods), speculation.py and host.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from backends import batching, constraints, host, scoring, speculation
from backends.batching import BatchCache, BatchGenerator, PromptCache
from backends.folders import hf_folder
from backends.sessions import KVSession, SessionBatchCache
from backends.speculation import NgramDraft
from backends.types import Chunk, GenerationConfig, MemoryStats, ModelInfo, UserError


class Backend(ABC):
    """One loaded model on one engine: implement `_load`, `session`, `memory`, `reset_peak_memory`,
    `info`; override the optional operations an engine has (a batched KV cache among them)."""

    name: str = "?"
    # whether load() takes compile=True (a compiled decode step, made by _compile_decode): torch
    # only. MLX decodes with mlx-lm's own uncompiled generate_step; llama.cpp is compiled C++ already.
    compiles: bool = False
    compiled = None  # the compiled decode step when loaded with compile=True (it compiles per cache length)

    def __init__(self, model, tokenizer, path: Path, config: dict, device: str, dtype: str,
                 quantization: str | None):
        self.model = model
        self.tokenizer = tokenizer  # a transformers tokenizer, the same on every engine
        self.path = Path(path)
        self.config = config  # config.json as a dict
        self.device = device
        self.dtype = dtype
        self.quantization = quantization
        self.eos_ids: frozenset[int] = hf_folder.eos_ids(path, tokenizer)
        self.context_length: int = hf_folder.context_length(config)
        self.vocab_size: int = int(config.get("vocab_size") or len(tokenizer))
        self.source: dict | None = hf_folder.provenance(path)
        self._grammars: constraints.Grammars | None = None

    @classmethod
    def load(cls, path: Path, *, device: str | None = None, dtype: str | None = None,
             trust_remote_code: bool = False, quantize: str | None = None, group_size: int = 64,
             compile: bool = False) -> "Backend":
        """Load an HF-format folder (config.json + safetensors + tokenizer) on `device` in `dtype`
        (None: the engine's default), quantized with `quantize` (groups of `group_size`) when
        given; compile=True adds a compiled decode step, refused before loading by an engine
        that has none (`compiles`)."""
        if compile and not cls.compiles:
            raise cls._unsupported("a compiled decode step (compile=True)")
        backend = cls._load(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                            quantize=quantize, group_size=group_size)
        if compile:
            backend._compile_decode()
        return backend

    # -- what every engine implements ------------------------------------

    @classmethod
    @abstractmethod
    def _load(cls, path: Path, *, device: str | None, dtype: str | None, trust_remote_code: bool,
              quantize: str | None, group_size: int) -> "Backend":
        """load() without compile: the engine's own loading."""

    @abstractmethod
    def session(self) -> KVSession:
        """A fresh KV session on this model."""

    @abstractmethod
    def memory(self) -> MemoryStats:
        """Memory in use and its peak since reset_peak_memory, with how it was measured."""

    @abstractmethod
    def reset_peak_memory(self) -> None: ...

    @abstractmethod
    def info(self) -> ModelInfo: ...

    def batch_logits(self, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """float32 logits [len(positions[i]), vocab] of each row at its positions (position p:
        the next-token logits after rows[i][:p + 1]). Engines override this with one right-padded
        forward pass over all rows: a causal model's logits at a position never see the padding
        after it, so no attention mask is needed. This fallback runs the rows one by one."""
        return [self.session().feed(list(ids))[list(pos)] for ids, pos in zip(rows, positions)]

    def memory_bandwidth(self) -> tuple[float | None, str]:
        """(GB/s, source) of the memory the weights are read from during decode (host.memory_bandwidth;
        engines with other devices, CUDA, override this)."""
        return host.memory_bandwidth(getattr(self, "device", "cpu"))

    def close(self) -> None:
        """Free the model's memory (engines override when they hold device caches)."""

    # -- optional operations: engines that have them override -------------

    def _compile_decode(self) -> None:
        """Build self.compiled, the compiled decode step (engines with `compiles`)."""
        raise self._unsupported("a compiled decode step (compile=True)")

    def batch_cache(self) -> BatchCache:
        """This engine's batched KV cache (backends/batching.py): what continuous batching needs."""
        raise self._unsupported("batched generation (continuous batching)")

    def one_row_cache(self) -> BatchCache:
        """The cache a batch of one runs on (a single generation): the engine's KV session, whose
        one-row forward passes carry no padding mask. torch with --compile overrides it."""
        return SessionBatchCache(self)

    def lora_train(self, train, val, config, out_dir, on_step=None, resume=False):
        """LoRA fine-tuning of this model in place, on the plan of backends/training.py (TrainConfig,
        Example lists); saves the adapter in the engine's own format under out_dir. Returns a TrainResult."""
        raise self._unsupported("LoRA training")

    def apply_adapter(self, adapter_dir: Path) -> None:
        """Put an adapter folder in this engine's format onto the model, replacing any it has."""
        raise self._unsupported("adapters")

    def save_quantized_folder(self, out: Path, scheme: str, group_size: int) -> str:
        """Write this (full-precision) model quantized with `scheme` as a folder this engine
        loads as it is; returns a description of what was quantized."""
        raise self._unsupported("quantized folders")

    def adapter_logits(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """float32 logits of `ids` without and with the adapter the model carries."""
        raise self._unsupported("adapters")

    def fuse_adapter(self, requantize: bool = True) -> str:
        """Merge the adapter into the (quantized) weights in place, re-quantizing the merged
        layers unless requantize is False; returns a description."""
        raise self._unsupported("adapter fusing")

    def save_quantized(self, out: Path) -> None:
        """Write the model as it stands (quantized, perhaps fused) as a folder this engine loads."""
        raise self._unsupported("quantized folders")

    @classmethod
    def _unsupported(cls, what: str) -> UserError:
        return UserError(f"the {cls.name} engine does not support {what}")

    # -- shared, on top of the above --------------------------------------

    @property
    def can_batch(self) -> bool:
        """Whether this engine has a batched KV cache (continuous batching)."""
        return type(self).batch_cache is not Backend.batch_cache

    def batch(self, max_batch: int = 8, prompt_cache_size: int = 8, draft: "Backend | NgramDraft | None" = None,
              num_draft: int = 4, prefill_chunk: int | None = None, stats=None) -> BatchGenerator:
        """The one scheduler on this model (backends/batching.py): up to `max_batch` sequences
        decoded together, joining and leaving between steps (one at a time on an engine without
        a batched KV cache; a batch of one runs on one_row_cache()). With `draft` (a draft model
        with this one's vocabulary, or an NgramDraft) each sequence drafts and the batch verifies
        every row's proposals in one pass, counted into `stats`; with `prefill_chunk`, at most
        that many prompt tokens are prefilled per step."""
        if max_batch <= 1 or not self.can_batch:
            cache, max_batch = self.one_row_cache(), 1
        else:
            cache = self.batch_cache()
            if draft is not None and type(cache).verify is BatchCache.verify:
                raise self._unsupported(f"prompt lookup inside a batch of more than one ({cache.cannot_verify}; "
                                        f"one sequence at a time speculates)")
        return BatchGenerator(cache, self.eos_ids, max_batch=max_batch, prompt_cache_size=prompt_cache_size,
                              draft=draft, num_draft=num_draft, vocab_size=self.vocab_size,
                              constrain=self.grammars.matcher, prefill_chunk=prefill_chunk, stats=stats)

    @property
    def grammars(self) -> constraints.Grammars:
        """This model's view for constrained decoding (its tokenizer for llguidance, built on first
        use; its compiled grammars). The server sets it to share one between two threads."""
        if self._grammars is None:
            self._grammars = constraints.Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars

    @grammars.setter
    def grammars(self, value: constraints.Grammars) -> None:
        self._grammars = value

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """Token ids of `messages` (and `tools`, for templates that render them) under the
        tokenizer's chat template (UserError without one)."""
        if not self.has_chat_template:
            raise UserError("this model has no chat template")
        out = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, tools=tools)
        if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in transformers 5
            out = out["input_ids"]
        return list(out)

    def check_fits(self, n_prompt: int, max_tokens: int = 0) -> None:
        """UserError for an empty prompt or one that, with max_tokens more, outgrows the context."""
        if n_prompt == 0:
            raise UserError("the prompt is empty")
        if n_prompt + max_tokens > self.context_length:
            raise UserError(
                f"prompt of {n_prompt} tokens + {max_tokens} new tokens is longer than "
                f"the model's context of {self.context_length} tokens")

    def stream(self, prompt_ids: list[int], gen: GenerationConfig, *,
               draft: "Backend | NgramDraft | None" = None, num_draft: int = 4, stats=None,
               cache: PromptCache | None = None) -> Iterator[Chunk]:
        """Generate from `prompt_ids`, one Chunk per token, until EOS (not yielded unless
        gen.ignore_eos), gen.max_tokens or a stop string of gen.stop: a batch of one in the one
        scheduler (batching.stream_one), so every sampling setting, grammar and logprobs (on each
        Chunk) works as in the server. With `draft` (a model with this one's vocabulary, or an
        NgramDraft) decoding is speculative, lossless, counted into `stats` (a SpeculationStats).
        With `cache` (a PromptCache: a conversation), the tokens its last prompt and reply share
        with this prompt are not computed again."""
        self.check_fits(len(prompt_ids), gen.max_tokens)
        if draft is not None:
            speculation.check_request(gen)
        if cache is not None:
            yield from cache.stream(prompt_ids, gen, draft=draft, num_draft=num_draft, stats=stats)
            return
        one = self.batch(max_batch=1, prompt_cache_size=0, draft=draft, num_draft=num_draft, stats=stats)
        yield from batching.stream_one(one, prompt_ids, gen, self.tokenizer, self.eos_ids)

    def generate(self, prompt_ids: list[int], gen: GenerationConfig, **kw) -> list[int]:
        """The token ids stream() yields."""
        return [c.token for c in self.stream(prompt_ids, gen, **kw)]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 next-token logits [len(ids), vocab], for parity checks."""
        return self.session().feed(list(ids))

    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int = 1, *,
              truncate: int | None = None) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, whether every token was the argmax) of each continuation
        given its context, with lm-evaluation-harness's semantics (backends/scoring.py): pairs
        encoded by encode_pair; a scored row (context + continuation[:-1]) longer than the model's
        context is an error, or with `truncate` (lm-eval's max_length) cut on the left, keeping the
        continuation. batch_size 1: pairs sharing a context reuse its KV cache; more: padded batches."""
        return scoring.score(self, pairs, batch_size, truncate=truncate)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is conditioned on: BOS, else EOS (scoring.prefix_token_id)."""
        return scoring.prefix_token_id(self)

    def encode_scored(self, text: str) -> list[int]:
        """Token ids of a text to score, as lm-eval encodes it (scoring.encode_scored)."""
        return scoring.encode_scored(self, text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), as lm-eval encodes a pair (scoring.encode_pair)."""
        return scoring.encode_pair(self, context, continuation)
