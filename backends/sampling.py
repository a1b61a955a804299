"""The one sampling rule, for both engines: float32 logits in, a distribution over the vocabulary out.

numpy only (float64 inside), so that MLX and torch draw from the same distribution given the same
logits, and so that the rule can be tested against a direct computation. Used by the one scheduler
(backends/batching.py) for every token on every engine, speculative rounds included.

The order is vLLM's and transformers' logits processors':

0. a grammar (backends/constraints.py): tokens it does not allow get x = -inf (they can never be
   drawn, greedy or not; the rest keep their logits);
1. penalties, on the raw logits x:
   - repetition penalty r (CTRL, Keskar et al. 2019; transformers, vLLM): every token that occurs
     in the prompt or the output so far has x -> x / r if x > 0 else x * r;
   - presence and frequency penalties (OpenAI's): x -> x - frequency * c - presence * [c > 0],
     c the token's count in the output so far (not the prompt, as OpenAI and vLLM);
2. temperature T: greedy (T == 0) is the one-hot argmax of the penalized logits and ignores the
   filters below; else p = softmax(x / T);
3. top-k: keep the k most probable tokens (ties broken by lower token id);
4. top-p (nucleus): of those, keep the smallest most-probable prefix whose mass, renormalised,
   reaches top_p (the most probable token always stays);
5. min-p: keep tokens with p >= min_p * max(p) (the ratio does not depend on the filters above);
6. renormalise what is kept.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from backends.types import GenerationConfig, UserError

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by a tinier one
# overflows to inf, and the distribution to NaN.
MIN_TEMPERATURE = 1e-5


class SamplingError(UserError):
    """The distribution is not a distribution (NaN or inf logits, or every token filtered out): an
    error for that request only, never a token id outside the vocabulary."""


def normalized(gen: GenerationConfig) -> GenerationConfig:
    """`gen` as every decode loop reads it: a temperature below MIN_TEMPERATURE is greedy (0)."""
    if gen.grammar is not None and gen.ignore_eos:
        raise UserError("ignore_eos cannot be combined with a grammar: a complete grammar allows only EOS")
    if 0 < gen.temperature < MIN_TEMPERATURE:
        return replace(gen, temperature=0.0)
    return gen


def uses_history(gen: GenerationConfig) -> bool:
    """Whether the rule needs the tokens so far (a penalty is on)."""
    return gen.repetition_penalty != 1.0 or gen.presence_penalty != 0.0 or gen.frequency_penalty != 0.0


def penalize(logits: np.ndarray, gen: GenerationConfig, prompt_ids: Sequence[int] = (),
             output_ids: Sequence[int] = ()) -> np.ndarray:
    """Step 1: the penalized logits (float64, a copy)."""
    x = np.array(logits, dtype=np.float64)
    vocab = x.shape[-1]
    if gen.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(list(prompt_ids) + list(output_ids), dtype=np.int64))
        seen = seen[(seen >= 0) & (seen < vocab)]
        v = x[seen]
        x[seen] = np.where(v > 0, v / gen.repetition_penalty, v * gen.repetition_penalty)
    if (gen.presence_penalty or gen.frequency_penalty) and len(output_ids):
        out = np.asarray(output_ids, dtype=np.int64)
        counts = np.bincount(out[(out >= 0) & (out < vocab)], minlength=vocab).astype(np.float64)
        x -= gen.frequency_penalty * counts + gen.presence_penalty * (counts > 0)
    return x


def distribution(logits: np.ndarray, gen: GenerationConfig, prompt_ids: Sequence[int] = (),
                 output_ids: Sequence[int] = (), allowed: np.ndarray | None = None) -> np.ndarray:
    """The distribution the next token is drawn from (float64, sums to 1); see the module docstring.
    Greedy is one-hot, which turns speculative decoding's acceptance rule into exact matching.
    `allowed`: bool [vocab], the grammar's mask (constraints.Matcher.allowed), None without one."""
    x = penalize(logits, gen, prompt_ids, output_ids) if uses_history(gen) else np.asarray(logits, np.float64)
    vocab = x.shape[-1]
    if not np.isfinite(x).all():
        # an engine's overflow (NaN), or a penalty that pushed a logit to inf: no token can be trusted
        raise SamplingError(f"the model's next-token logits are not finite ({int((~np.isfinite(x)).sum())} of "
                            f"{vocab}); try float32 (--dtype float32) or milder penalties")
    if allowed is not None:
        if not allowed.any():
            raise SamplingError("the grammar allows no next token")
        x = np.where(allowed[:vocab], x, -np.inf)
    if gen.temperature < MIN_TEMPERATURE:
        p = np.zeros(vocab)
        p[int(np.argmax(x))] = 1.0
        return p
    x = x / gen.temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = np.ones(vocab, dtype=bool)
    if 0 < gen.top_k < vocab:
        keep[:] = False
        keep[most_probable(p, gen.top_k)[:gen.top_k]] = True
    if gen.top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        order = nucleus_order(q, gen.top_p)
        sorted_q = q[order]
        nucleus = np.zeros(vocab, dtype=bool)  # every token after `order` is past it too
        nucleus[order[np.cumsum(sorted_q) - sorted_q < gen.top_p]] = True  # the first token always stays
        keep &= nucleus
    if gen.min_p > 0.0:
        keep &= p >= gen.min_p * p.max()
    if not keep.all():
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def most_probable(p: np.ndarray, k: int) -> np.ndarray:
    """The start of argsort(-p, kind="stable") (most probable first, ties by lower id): its first k
    ids (fewer when fewer tokens have p > 0), and any tied with the k-th, without sorting the
    whole vocabulary: a partition finds them and only they are sorted (a full stable sort of 49k
    entries took ~5 ms, a row a step). Every token it leaves out comes after all it returns."""
    # Tokens that cannot be drawn (p == 0: masked, filtered out, underflowed) change no
    # distribution wherever they sort, so they are left out (a partition over many equal zeros
    # is numpy's slow case). Ids stay ascending, which the stable sort keeps for ties.
    ids = np.flatnonzero(p > 0)
    if k < len(ids):
        values = p[ids]
        ids = ids[values >= np.partition(values, len(values) - k)[len(values) - k]]  # >= the k-th largest
    return ids[np.argsort(-p[ids], kind="stable")]


def nucleus_order(q: np.ndarray, top_p: float) -> np.ndarray:
    """The most probable tokens in argsort(-q, kind="stable")'s order, as far as it takes for their
    mass to reach top_p: every token after them is outside the nucleus. Doubles the candidates
    until it does (a flat distribution ends with the whole vocabulary)."""
    k = 64
    while True:
        order = most_probable(q, k)
        if k >= len(q) or q[order].sum() >= top_p:
            return order
        k *= 4


def choose(logits: np.ndarray, gen: GenerationConfig, prompt_ids: Sequence[int], output_ids: Sequence[int],
           allowed: np.ndarray | None, rng: np.random.Generator) -> int:
    """The next token: sample(distribution(...), rng), with greedy's one-hot never built. At batch
    8 building and summing 49k-entry one-hots cost ~0.5 ms a row a step; the argmax of the
    float32 logits is the same token (float32 -> float64 is exact), and the generator draws once,
    as sample() does, so a request's draws do not depend on the path."""
    if gen.temperature >= MIN_TEMPERATURE:
        return sample(distribution(logits, gen, prompt_ids, output_ids, allowed), rng)
    x = penalize(logits, gen, prompt_ids, output_ids) if uses_history(gen) else np.asarray(logits)
    if not np.isfinite(x).all():
        return sample(distribution(logits, gen, prompt_ids, output_ids, allowed), rng)  # its error
    if allowed is not None:
        if not allowed.any():
            raise SamplingError("the grammar allows no next token")
        x = np.where(allowed[:x.shape[-1]], x, -np.inf)
    rng.random()
    return int(np.argmax(x))


def logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """(log-probability of `token`, the `top` most likely (token, log-probability) pairs, ties by
    lower id) under log-softmax of the engine's logits, before any sampling rule (vLLM's default,
    OpenAI's logprobs): what the model thinks, whatever a grammar or a temperature then did."""
    return logprobs_of(np.asarray(logits)[None], [token], top)[0]


def logprobs_of(logits: np.ndarray, tokens, top: int, rows_at_once: int = 128) -> list[tuple]:
    """`logprobs` for many positions at once: logits [n, vocab] (each position's next-token logits)
    and the n tokens that followed; (log-probability, top pairs) per position, the same values,
    computed a block of rows at a time (a prompt's full-vocabulary float64 rows would not fit)."""
    tokens = np.asarray(tokens)
    out = []
    for start in range(0, len(tokens), rows_at_once):
        x = np.asarray(logits[start:start + rows_at_once], np.float64)
        m = x.max(axis=-1, keepdims=True)
        lp = x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))
        chosen = lp[np.arange(len(lp)), tokens[start:start + rows_at_once]]
        if top > 0:
            near = np.argpartition(-lp, min(top, lp.shape[1]) - 1, axis=-1)[:, :top]
            for row, candidates in enumerate(near):
                best = sorted(candidates, key=lambda i: (-lp[row, i], i))  # ties by lower id, as logprobs
                out.append((float(chosen[row]), tuple((int(i), float(lp[row, i])) for i in best)))
        else:
            out.extend((float(c), ()) for c in chosen)
    return out


def sample(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Draw an index with probability proportional to `weights` (never a zero-weight one): one
    uniform draw, inverted through the cumulative sum, so equal weights and seeds give equal tokens."""
    cdf = np.cumsum(weights)
    if not np.isfinite(cdf[-1]) or cdf[-1] <= 0:
        raise SamplingError("the sampling distribution is empty or not finite")
    # the min() keeps a rounding at the very top of the cumulative sum inside the vocabulary
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
