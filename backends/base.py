"""The engine interface: the whole contract between billion and an engine.

Nothing here imports mlx or torch. What crosses the boundary is ints, lists of
ints, floats, str, numpy arrays (for logits) and the small frozen dataclasses
(backends/types.py) — never an mx.array or a torch.Tensor.

Shared algorithms that need a model but not a framework (streaming text,
context checks, log-likelihood scoring over KV sessions) live here once, as
template methods; each engine supplies only the small framework-facing pieces.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from backends import host
from backends.folders import hf_folder
from backends.speculation import NgramDraft, speculative_tokens
from backends.types import Chunk, GenerationConfig, MemoryStats, ModelInfo, UserError

__all__ = ["Backend", "KVSession", "IncrementalDetokenizer", "Chunk", "GenerationConfig", "MemoryStats",
           "ModelInfo", "UserError", "log_softmax", "score_encoded", "score_batched"]


# ---------------------------------------------------------------- KV sessions


class KVSession(ABC):
    """A model plus its KV cache: feed tokens, read logits, roll back.

    Speculative decoding and log-likelihood scoring are written once on top of
    this (see backends/speculation.py and Backend.score).
    """

    length: int = 0  # tokens in the cache

    @abstractmethod
    def feed(self, ids: Sequence[int], keep: int = 0) -> np.ndarray:
        """Append `ids` to the cache; return float32 logits [n, vocab] for the
        last `keep` positions (all positions when keep == 0)."""

    @abstractmethod
    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens."""


# ---------------------------------------------------------------- streaming text


class IncrementalDetokenizer:
    """Turns a token stream into text pieces.

    Decodes the tokens of the current line together (SentencePiece drops a
    leading space when a token is decoded alone) and holds text back while it
    ends in an incomplete UTF-8 character (U+FFFD), like transformers'
    TextStreamer; the cost per token is one decode of the current line.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.line: list[int] = []
        self.emitted = 0

    def add(self, token: int) -> str:
        self.line.append(token)
        text = self.tokenizer.decode(self.line, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted :]
        if text.endswith("\n"):
            self.line, self.emitted = [], 0
        else:
            self.emitted = len(text)
        return piece


# ---------------------------------------------------------------- the interface


class Backend(ABC):
    """One loaded model on one engine.

    Engines implement: `load`, `_token_stream`, `session`, `memory`,
    `reset_peak_memory`, `info`. Everything else is shared here.
    """

    name: str = "?"

    def __init__(self, model, tokenizer, path: Path, config: dict, device: str, dtype: str,
                 quantization: str | None):
        self.model = model
        self.tokenizer = tokenizer  # a transformers tokenizer, the same on both engines
        self.path = Path(path)
        self.config = config  # config.json as a dict
        self.device = device
        self.dtype = dtype
        self.quantization = quantization
        self.eos_ids: frozenset[int] = hf_folder.eos_ids(path, tokenizer)
        self.context_length: int = hf_folder.context_length(config)
        self.vocab_size: int = int(config.get("vocab_size") or len(tokenizer))
        self.source: dict | None = hf_folder.provenance(path)

    # -- engine-specific ---------------------------------------------------

    @classmethod
    @abstractmethod
    def load(cls, path: Path, *, device: str | None = None, dtype: str | None = None,
             trust_remote_code: bool = False, quantize: str | None = None,
             group_size: int = 64) -> "Backend":
        """Load an HF-format folder (config.json + safetensors + tokenizer)."""

    @abstractmethod
    def _token_stream(self, prompt_ids: list[int], gen: GenerationConfig) -> Iterator[int]:
        """Yield up to gen.max_tokens token ids (no EOS handling), each only once
        the device has computed it."""

    @abstractmethod
    def session(self) -> KVSession:
        """A fresh KV session on this model."""

    @abstractmethod
    def memory(self) -> MemoryStats: ...

    @abstractmethod
    def reset_peak_memory(self) -> None: ...

    @abstractmethod
    def info(self) -> ModelInfo: ...

    # -- engine operations beyond inference (each engine's quant/train module does the work) --

    def lora_train(self, train, val, config, out_dir, on_step=None, resume=False):
        """LoRA fine-tuning of this model in place, on the plan of backends/training.py
        (TrainConfig, Example lists); saves the adapter in the engine's own format
        under out_dir. Returns a TrainResult."""
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

    def _unsupported(self, what: str) -> UserError:
        return UserError(f"the {self.name} engine does not support {what}")

    def close(self) -> None:
        """Free the model's memory (engines override when they hold device caches)."""

    def memory_bandwidth(self) -> tuple[float | None, str]:
        """(GB/s, source) of the memory the weights are read from during decode.

        Apple GPUs: the chip's published figure; CPUs: measured here. Engines
        with other devices (CUDA) override this.
        """
        if getattr(self, "device", "cpu") in ("gpu", "mps"):
            chip = host.chip_name()
            value = host.apple_bandwidth_gbs(chip)
            return value, f"published figure for {chip}" if value else f"unknown chip {chip!r}"
        return (host.measured_read_bandwidth_gbs(),
                "measured host read bandwidth (numpy sums over 1 GiB on every core, best of 10)")

    # -- shared -------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template:
            raise UserError("this model has no chat template")
        out = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in transformers 5
            out = out["input_ids"]
        return list(out)

    def check_fits(self, n_prompt: int, max_tokens: int = 0) -> None:
        if n_prompt == 0:
            raise UserError("the prompt is empty")
        if n_prompt + max_tokens > self.context_length:
            raise UserError(
                f"prompt of {n_prompt} tokens + {max_tokens} new tokens is longer than "
                f"the model's context of {self.context_length} tokens")

    def stream(self, prompt_ids: list[int], gen: GenerationConfig, *,
               draft: "Backend | NgramDraft | None" = None, num_draft: int = 4, stats=None) -> Iterator[Chunk]:
        """Generate from `prompt_ids`, one Chunk per token.

        Stops at EOS (unless gen.ignore_eos; the EOS token itself is not
        yielded) or after gen.max_tokens. With `draft` (a draft model with this
        one's vocabulary, or an NgramDraft: prompt lookup, no model), tokens
        come from speculative decoding (lossless: same distribution as
        without), counted into `stats` (a backends.speculation.SpeculationStats)
        when given.
        """
        self.check_fits(len(prompt_ids), gen.max_tokens)
        if draft is not None:
            tokens = speculative_tokens(self, draft, list(prompt_ids), gen, num_draft, stats)
        else:
            tokens = ((t, False) for t in self._token_stream(list(prompt_ids), gen))
        detok = IncrementalDetokenizer(self.tokenizer)
        try:
            for n, (token, from_draft) in enumerate(tokens):
                now = time.perf_counter()
                if token in self.eos_ids and not gen.ignore_eos:
                    break
                last = n + 1 >= gen.max_tokens
                yield Chunk(token, detok.add(token), now, from_draft, "max_tokens" if last else None)
                if last:
                    break
        finally:
            close = getattr(tokens, "close", None)
            if close:
                close()

    def generate(self, prompt_ids: list[int], gen: GenerationConfig, **kw) -> list[int]:
        return [c.token for c in self.stream(prompt_ids, gen, **kw)]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 next-token logits [len(ids), vocab], for parity checks."""
        return self.session().feed(list(ids))

    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int = 1) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation given its context.

        lm-evaluation-harness semantics: trailing spaces of the context move to
        the continuation; the continuation's tokens are those of
        tokenize(context + continuation) past tokenize(context). Returns
        (sum of log-probabilities, whether every token was the argmax).
        batch_size 1: pairs sharing a context reuse its KV cache; more: pairs
        run as padded batches (score_batched).
        """
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        if batch_size > 1:
            return score_batched(self, encoded, batch_size)
        return score_encoded(self, encoded)

    def batch_logits(self, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """float32 logits [len(positions[i]), vocab] of each row at its positions
        (position p: the next-token logits after rows[i][:p + 1]).

        Engines override this with one right-padded forward pass over all rows:
        a causal model's logits at a position never see the padding after it,
        so no attention mask is needed. This fallback runs the rows one by one.
        """
        return [self.session().feed(list(ids))[list(pos)] for ids, pos in zip(rows, positions)]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip(" "))
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tokenize(context + continuation)
        ctx = self.tokenize(context)
        return whole[: len(ctx)], whole[len(ctx):]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score_encoded(backend: Backend, encoded: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """Score (context ids, continuation ids) pairs; a context shared by
    consecutive pairs is fed once and its cache cropped back after each
    continuation."""
    results: list[tuple[float, bool]] = []
    session, current_ctx, ctx_logits = None, None, None
    for ctx, cont in encoded:
        if not cont:
            raise UserError("empty continuation")
        if not ctx:  # lm-eval: an empty context is conditioned on EOS/BOS
            ctx = [next(iter(backend.eos_ids))]
        backend.check_fits(len(ctx) + len(cont) - 1)
        if ctx != current_ctx:
            session = backend.session()
            ctx_logits = session.feed(ctx, keep=1)[-1]
            current_ctx = ctx
        logits = [ctx_logits]
        if len(cont) > 1:
            logits.extend(session.feed(cont[:-1]))
            session.crop(len(ctx))
        logp = log_softmax(np.stack(logits))
        total = float(sum(logp[i, t] for i, t in enumerate(cont)))
        greedy = all(int(np.argmax(logp[i])) == t for i, t in enumerate(cont))
        results.append((total, greedy))
    return results


def score_batched(backend: Backend, encoded: Sequence[tuple[list[int], list[int]]],
                  batch_size: int) -> list[tuple[float, bool]]:
    """Score (context ids, continuation ids) pairs in padded batches, as
    lm-evaluation-harness does: each pair is the row context + continuation[:-1];
    pairs with the same row (one context with one-token continuations, such as
    MMLU's " A" ... " D") share it; rows run longest first, batch_size at a time."""
    rows: dict[tuple, list[int]] = {}  # row -> indices of the pairs it scores
    fixed = []
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise UserError("empty continuation")
        if not ctx:  # lm-eval: an empty context is conditioned on EOS/BOS
            ctx = [next(iter(backend.eos_ids))]
        row = tuple(ctx) + tuple(cont[:-1])
        backend.check_fits(len(row))
        rows.setdefault(row, []).append(i)
        fixed.append((ctx, cont))
    results: list = [None] * len(encoded)
    order = sorted(rows, key=len, reverse=True)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        # positions whose next-token logits score some continuation of this row
        positions = [sorted({p for i in rows[r] for p in range(len(fixed[i][0]) - 1, len(r))}) for r in chunk]
        for r, pos, logits in zip(chunk, positions, backend.batch_logits([list(r) for r in chunk], positions)):
            logp = dict(zip(pos, log_softmax(logits)))
            for i in rows[r]:
                ctx, cont = fixed[i]
                steps = [logp[len(ctx) - 1 + k] for k in range(len(cont))]
                results[i] = (float(sum(s[t] for s, t in zip(steps, cont))),
                              all(int(np.argmax(s)) == t for s, t in zip(steps, cont)))
    return results
