"""Speculative decoding, once for every engine, on two KV sessions.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
Decoding") and Chen et al. 2023: a cheap draft model proposes k tokens one by
one; the target scores all of them in ONE forward pass; a rejection rule keeps
a prefix of them so that the output has exactly the target's distribution
(greedy: exactly the target's greedy tokens). Written on `KVSession.feed/crop`
so MLX and torch share the loop, the acceptance rule and the statistics
(mlx-lm's own draft support does not report acceptance, nor does transformers').

The loop is numpy on float32 logits: the engines hand over [n, vocab] rows per
forward pass, which costs microseconds beside the forward passes themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from backends.base import GenerationConfig, UserError


@dataclass
class SpeculationStats:
    """What the draft achieved; the one definition both engines report.

    A round drafts 1..k tokens and verifies them with one target pass; it
    keeps `accepted` of them and always gains one target token after them
    (the resampled correction, or the bonus token when all were accepted).
    acceptance = accepted / drafted.
    """

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # rounds that ended on a rejected draft token (the others accepted all)
    histogram: list[int] = field(default_factory=list)  # histogram[n]: rounds that accepted n tokens

    def record(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.rejections += accepted < drafted
        self.histogram.extend([0] * (accepted + 1 - len(self.histogram)))
        self.histogram[accepted] += 1

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.rounds if self.rounds else math.nan

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "rejections": self.rejections, "acceptance": self.acceptance,
                "mean_accepted_per_round": self.mean_accepted, "accepted_histogram": list(self.histogram)}


def distribution(logits: np.ndarray, gen: GenerationConfig) -> np.ndarray:
    """The distribution a token is drawn from: softmax(logits / T) cut to the
    top-p nucleus (as the torch engine's sampler does); greedy is the one-hot
    argmax, which turns the sampling rule below into exact greedy matching."""
    if gen.temperature <= 0:
        p = np.zeros(logits.shape[-1])
        p[int(np.argmax(logits))] = 1.0
        return p
    x = logits.astype(np.float64) / gen.temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if gen.top_p < 1.0:
        order = np.argsort(-p)
        sorted_p = p[order]
        p[order[np.cumsum(sorted_p) - sorted_p >= gen.top_p]] = 0.0  # the first token always stays
        p /= p.sum()
    return p


def sample(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Draw an index with probability proportional to `weights` (never a zero-weight one)."""
    cdf = np.cumsum(weights)
    return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))


def speculative_tokens(target, draft, prompt_ids: list[int], gen: GenerationConfig, num_draft: int,
                       stats: SpeculationStats | None = None) -> Iterator[tuple[int, bool]]:
    """Yield (token, from_draft) until gen.max_tokens tokens (the caller stops at EOS).

    The first token comes from the target's prefill; then rounds. `stats`, when
    given, counts every round. Closing the generator mid-round is safe.
    """
    if num_draft < 1:
        raise UserError(f"the number of draft tokens must be at least 1 (got {num_draft})")
    if draft.vocab_size != target.vocab_size:
        raise UserError(f"draft vocabulary ({draft.vocab_size}) differs from the target's ({target.vocab_size})")
    draft.check_fits(len(prompt_ids), gen.max_tokens)
    stats = stats if stats is not None else SpeculationStats()
    rng = np.random.default_rng(gen.seed)
    stop = frozenset() if gen.ignore_eos else target.eos_ids
    tgt, dft = target.session(), draft.session()
    # Prefill both before the first token, so the time after it is rounds only.
    p = distribution(tgt.feed(prompt_ids, keep=1)[-1], gen)
    dft.feed(prompt_ids, keep=1)
    tokens = list(prompt_ids) + [sample(p, rng)]  # committed: prompt + output
    yield tokens[-1], False
    produced = 1
    while produced < gen.max_tokens:
        # 1. Draft x_1..x_k ~ q_i autoregressively, never past max_tokens nor past an EOS.
        #    The draft cache first catches up with committed tokens it has not seen
        #    (the last one, or the last two after a round that accepted everything).
        k = min(num_draft, gen.max_tokens - produced - 1)
        drafted, q = [], []
        while len(drafted) < k and not (drafted and drafted[-1] in stop):
            seen = tokens + drafted
            q.append(distribution(dft.feed(seen[dft.length:], keep=1)[-1], gen))
            drafted.append(sample(q[-1], rng))
        # 2. Verify: one target pass over the last committed token and the drafts gives
        #    p_1..p_{k+1}, the target's distribution at every drafted position and one beyond.
        n = len(drafted)
        p = [distribution(row, gen) for row in tgt.feed((tokens + drafted)[tgt.length:], keep=n + 1)]
        # 3. Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)) (u < ratio, u ~ U[0, 1)),
        #    stopping at the first rejection. Greedy (one-hot p and q): accept while x_i is the
        #    target's argmax.
        accepted = 0
        while accepted < n and rng.random() * q[accepted][drafted[accepted]] < p[accepted][drafted[accepted]]:
            accepted += 1
        # 4. Always gain one target token. After a rejection at i, draw from the residual
        #    r = max(0, p_i - q_i) / sum(max(0, p_i - q_i)). Then, since P(reject) = 1 - sum(min(p_i, q_i))
        #    = sum(max(0, p_i - q_i)):  P(x) = q_i(x) min(1, p_i(x)/q_i(x)) + P(reject) r(x)
        #    = min(p_i, q_i)(x) + max(0, p_i(x) - q_i(x)) = p_i(x), the target's distribution
        #    (greedy: the target's argmax). All accepted: the bonus token from p_{k+1}.
        if accepted < n:
            residual = np.maximum(p[accepted] - q[accepted], 0.0)
            nxt = sample(residual if residual.sum() > 0 else p[accepted], rng)  # > 0 whenever p_i != q_i
        else:
            nxt = sample(p[n], rng)
        if n:
            stats.record(n, accepted)
        tokens += drafted[:accepted] + [nxt]
        # 5. Roll both caches back to the committed prefix minus its last token, which
        #    the next round feeds (the draft may hold less: it never fed its last draft).
        tgt.crop(len(tokens) - 1)
        dft.crop(len(tokens) - 1)
        produced += accepted + 1
        for token in drafted[:accepted]:
            yield token, True
        yield nxt, False
