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

from backends import host, sampling
from backends.folders import hf_folder
from backends.speculation import NgramDraft, speculative_tokens
from backends.types import Chunk, GenerationConfig, MemoryStats, ModelInfo, UserError

__all__ = ["Backend", "KVSession", "PromptCache", "IncrementalDetokenizer", "StopText", "session_tokens", "Chunk", "GenerationConfig", "MemoryStats",
           "ModelInfo", "UserError", "log_softmax", "score_encoded", "score_batched", "scoring_context", "fit_left"]


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


class PromptCache:
    """The KV session of a conversation so far, kept between prompts (chat turns, server requests).

    Holds (session, ids): the tokens the session's cache holds. A new prompt crops the session to
    the longest common prefix of `ids` and the prompt and feeds only the rest, so a conversation's
    next turn costs its new tokens, not the whole transcript. A prefix's KV cache is exactly that
    prefix's, so cropping is always correct: an edited history or a new system message (a common
    prefix shorter than the cached ids) keeps only what is still shared, nothing at all when the
    first token differs. `reset()` forgets everything (/clear). Not thread-safe: one generation
    at a time (the server holds a lock per engine).
    """

    def __init__(self, backend: "Backend"):
        self.backend = backend
        self.session: KVSession | None = None
        self.ids: list[int] = []
        self.reused = 0  # prompt tokens the last prompt found in the cache

    def reset(self) -> None:
        self.session, self.ids, self.reused = None, [], 0

    def take(self, prompt_ids: Sequence[int]) -> KVSession:
        """The session, cropped to what it shares with `prompt_ids` (at most all but the last
        prompt token, which is fed again for the next-token logits); self.ids is that prefix."""
        n = 0
        limit = min(len(self.ids), len(prompt_ids) - 1)
        while n < limit and self.ids[n] == prompt_ids[n]:
            n += 1
        if self.session is None or n == 0:
            self.session, self.ids = self.backend.session(), []
        else:
            self.session.crop(n)
            del self.ids[n:]
        self.reused = n
        return self.session


def session_tokens(model, prompt_ids: list[int], gen: GenerationConfig,
                   cache: PromptCache | None = None) -> Iterator[int]:
    """Yield up to gen.max_tokens token ids (no EOS handling) from a KV session: the one decode
    loop both engines share, sampling with backends/sampling.py (numpy's generator seeded with
    gen.seed), so both draw the same tokens given the same logits. `model`: anything with
    session() (a Backend). With `cache`, the conversation's session is reused (PromptCache.take)
    and left holding the prompt and the tokens fed after it."""
    rng = np.random.default_rng(gen.seed)
    session = cache.take(prompt_ids) if cache is not None else model.session()
    fed = cache.ids if cache is not None else []
    output: list[int] = []
    try:
        logits = session.feed(prompt_ids[len(fed):], keep=1)[-1]
        fed.extend(prompt_ids[len(fed):])
        for n in range(gen.max_tokens):
            token = sampling.sample(sampling.distribution(logits, gen, prompt_ids, output), rng)
            output.append(token)
            yield token
            if n + 1 == gen.max_tokens:
                break
            logits = session.feed([token], keep=1)[-1]
            fed.append(token)
    except BaseException as e:
        # a feed that failed or was interrupted (Ctrl-C) leaves the cache in an unknown state;
        # closing the generator (GeneratorExit, at a yield) leaves it exactly as `fed` says
        if cache is not None and not isinstance(e, GeneratorExit):
            cache.reset()
        raise


def _untagged(tokens: Iterator[int]) -> Iterator[tuple[int, bool]]:
    try:
        for token in tokens:
            yield token, False
    finally:
        close = getattr(tokens, "close", None)
        if close:
            close()


# ---------------------------------------------------------------- streaming text


class StopText:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to show now, whether a stop string was reached)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text



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
    # whether load() takes compile=True (a compiled decode step): torch only. MLX decodes with
    # mlx-lm's own uncompiled generate_step; llama.cpp is compiled C++ already.
    compiles: bool = False
    compiled = None  # the compiled decode step when loaded with compile=True (it compiles per cache length)

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
                "measured host read bandwidth (1 GiB read on every core by the fastest of numpy dot, max "
                "and sum, best of 10)")

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
               draft: "Backend | NgramDraft | None" = None, num_draft: int = 4, stats=None,
               cache: PromptCache | None = None) -> Iterator[Chunk]:
        """Generate from `prompt_ids`, one Chunk per token.

        Stops at EOS (unless gen.ignore_eos; the EOS token itself is not
        yielded), after gen.max_tokens, or at a stop string (gen.stop: the
        chunk that completes it has finish_reason "stop" and the text before
        it; while the text so far could be the start of one, chunks are held
        back, then delivered with their own timestamps). With `draft` (a draft
        model with this one's vocabulary, or an NgramDraft: prompt lookup, no
        model), tokens come from speculative decoding (lossless: same
        distribution as without), counted into `stats` (a
        backends.speculation.SpeculationStats) when given. Top-k, min-p and
        the penalties, or a `cache` (PromptCache: the conversation's KV session,
        reused), run the shared KV-session loop (session_tokens); plain
        greedy / temperature / top-p runs the engine's own loop.
        """
        self.check_fits(len(prompt_ids), gen.max_tokens)
        if draft is not None:
            tokens = speculative_tokens(self, draft, list(prompt_ids), gen, num_draft, stats)
        elif cache is not None or sampling.needs_shared_loop(gen):
            tokens = _untagged(self.session_tokens(list(prompt_ids), gen, cache))
        else:
            tokens = _untagged(self._token_stream(list(prompt_ids), gen))
        detok = IncrementalDetokenizer(self.tokenizer)
        stop = StopText(tuple(gen.stop)) if gen.stop else None
        held: list[tuple[int, float, bool]] = []  # chunks whose text may start a stop string
        ready = ""  # text safe to deliver with the held chunks
        try:
            for n, (token, from_draft) in enumerate(tokens):
                now = time.perf_counter()
                if token in self.eos_ids and not gen.ignore_eos:
                    break
                last = n + 1 >= gen.max_tokens
                piece = detok.add(token)
                if stop is None:
                    yield Chunk(token, piece, now, from_draft, "max_tokens" if last else None)
                    if last:
                        break
                    continue
                text, hit = stop.push(piece)
                ready += text
                held.append((token, now, from_draft))
                reason = "stop" if hit else "max_tokens" if last else None
                if reason is None and stop.held:
                    continue
                if reason == "max_tokens":
                    ready += stop.flush()
                yield from self._release(held, ready, reason)
                held, ready = [], ""
                if reason:
                    break
            if held:  # EOS (or the end) with text held back: it was no stop string after all
                yield from self._release(held, ready + stop.flush(), None)
        finally:
            tokens.close()

    @staticmethod
    def _release(held: list, text: str, reason: str | None) -> Iterator[Chunk]:
        for token, now, from_draft in held[:-1]:
            yield Chunk(token, "", now, from_draft)
        token, now, from_draft = held[-1]
        yield Chunk(token, text, now, from_draft, reason)

    def session_tokens(self, prompt_ids: list[int], gen: GenerationConfig,
                       cache: PromptCache | None = None) -> Iterator[int]:
        """The shared KV-session decode loop (module function session_tokens)."""
        return session_tokens(self, prompt_ids, gen, cache)

    def generate(self, prompt_ids: list[int], gen: GenerationConfig, **kw) -> list[int]:
        return [c.token for c in self.stream(prompt_ids, gen, **kw)]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 next-token logits [len(ids), vocab], for parity checks."""
        return self.session().feed(list(ids))

    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int = 1, *,
              truncate: int | None = None) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation given its context.

        lm-evaluation-harness semantics (its TemplateLM.loglikelihood and HF model): see
        encode_pair. Returns (sum of log-probabilities, whether every token was the argmax).
        A scored row (context + continuation[:-1]) longer than the model's context is an
        error; with `truncate` (a length in tokens, e.g. lm-eval's max_length) rows longer
        than that are cut on the left as lm-eval's HF model cuts them (the continuation is
        kept). batch_size 1: pairs sharing a context reuse its KV cache; more: pairs run as
        padded batches (score_batched).
        """
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        if truncate is not None:
            encoded = [fit_left(self, ctx, cont, truncate) for ctx, cont in encoded]
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

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is conditioned on: BOS when the tokenizer has one, else
        EOS (lm-eval's HF model, `prefix_token_id`)."""
        for token in (getattr(self.tokenizer, "bos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if token is not None:
                return int(token)
        if self.eos_ids:
            return min(self.eos_ids)
        raise UserError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")

    def encode_scored(self, text: str) -> list[int]:
        """Token ids of a text to score, as lm-eval's HF model encodes it (`tok_encode`): the
        tokenizer's own special tokens, except when the text already starts with the prefix
        token's text (a chat-templated prompt carrying its BOS), which is not doubled."""
        prefix = self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
        return self.tokenize(text, add_special_tokens=not (prefix and text.startswith(prefix)))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), exactly as lm-evaluation-harness encodes a pair.

        ALL trailing whitespace of the context moves into the continuation (`_encode_pair`:
        `context.rstrip()`); the continuation's tokens are those of encode_scored(context +
        continuation) past encode_scored(context). An empty context is the prefix token
        (BOS, else EOS) and the continuation is encoded without special tokens; if it
        already starts with that token, that token is the context instead.
        """
        if context == "":
            cont = self.tokenize(continuation, add_special_tokens=False)
            prefix = self.prefix_token_id
            return (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode_scored(context + continuation)
        ctx = self.encode_scored(context)
        return whole[: len(ctx)], whole[len(ctx):]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def scoring_context(backend: Backend, ctx: Sequence[int]) -> list[int]:
    """The context a continuation is scored after: an empty one (a whitespace-only context
    whose spaces moved into the continuation) becomes the prefix token, BOS else EOS, as
    lm-eval conditions an empty context."""
    return list(ctx) if ctx else [backend.prefix_token_id]


def fit_left(backend: Backend, ctx: Sequence[int], cont: Sequence[int],
             max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Cut the context on the left so that the scored row (context + continuation[:-1]) is at
    most max_length tokens (default: the model's context), as lm-eval's HF model does; the
    continuation is never cut."""
    ctx = scoring_context(backend, ctx)
    limit = min(max_length or backend.context_length, backend.context_length)
    room = limit + 1 - len(cont)
    if room < 1:
        raise UserError(f"a continuation of {len(cont)} tokens does not fit in {limit} tokens")
    return list(ctx[-room:]) if len(ctx) > room else list(ctx), list(cont)


def score_encoded(backend: Backend, encoded: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """Score (context ids, continuation ids) pairs; a context shared by
    consecutive pairs is fed once and its cache cropped back after each
    continuation."""
    results: list[tuple[float, bool]] = []
    session, current_ctx, ctx_logits = None, None, None
    for ctx, cont in encoded:
        if not cont:
            raise UserError("empty continuation")
        ctx = scoring_context(backend, ctx)
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
        ctx = scoring_context(backend, ctx)
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
