"""Speculative decoding's parts, once for every engine: the proposers, the acceptance rule, the statistics.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
Decoding") and Chen et al. 2023: a cheap proposer drafts k tokens; the target
scores all of them in ONE forward pass; a rejection rule keeps a prefix of
them so that the output has exactly the target's distribution (greedy:
exactly the target's greedy tokens). The rounds run in the one scheduler
(backends/batching.py, BatchGenerator._speculative_step), every row with its own
proposer, on every engine: a batch of one is a KV session (sessions.SessionBatchCache),
so MLX and torch share the loop, the acceptance rule and the statistics (mlx-lm's own
draft support does not report acceptance, nor does transformers').

Two proposers: a draft model (a smaller Backend with the target's vocabulary,
sampled token by token on its own KV session), and prompt lookup (NgramDraft:
no model; it copies what followed an earlier occurrence of the text's last
tokens). The rule only needs the drafted tokens and the distributions q_i they
were drawn from.

All numpy on float32 logits: the engines hand over [n, vocab] rows per
forward pass, which costs microseconds beside the forward passes themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from backends.sampling import distribution, sample, uses_history  # the one sampling rule (re-exported here)
from backends.types import GenerationConfig, UserError


@dataclass
class SpeculationStats:
    """What the draft achieved; the one definition both engines report.

    A round drafts 1..k tokens and verifies them with one target pass; it
    keeps `accepted` of them and always gains one target token after them
    (the resampled correction, or the bonus token when all were accepted).
    acceptance = accepted / drafted. A round whose proposer found nothing
    (prompt lookup without a match) is a plain target step: it counts in
    `no_match`, not in `rounds`.
    """

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # rounds that ended on a rejected draft token (the others accepted all)
    histogram: list[int] = field(default_factory=list)  # histogram[n]: rounds that accepted n tokens
    no_match: int = 0  # rounds that proposed nothing

    def record(self, drafted: int, accepted: int) -> None:
        if not drafted:
            self.no_match += 1
            return
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
                "mean_accepted_per_round": self.mean_accepted, "accepted_histogram": list(self.histogram),
                "no_match_rounds": self.no_match}


# ---------------------------------------------------------------- proposers


class Proposer(Protocol):
    def propose(self, tokens: list[int], k: int) -> tuple[list[int], list[np.ndarray]]:
        """At most k tokens to follow `tokens` (prompt + output so far, all committed: from one call
        to the next the list only grows), never past an EOS, and the distribution q_i each was drawn from."""


class ModelProposer:
    """A draft model samples x_i ~ q_i one token at a time, on its own KV session."""

    def __init__(self, draft, prompt_ids: list[int], gen: GenerationConfig, rng: np.random.Generator,
                 stop: frozenset):
        draft.check_fits(len(prompt_ids), gen.max_tokens)
        self.gen, self.rng, self.stop = gen, rng, stop
        self.session = draft.session()
        self.session.feed(prompt_ids, keep=1)  # prefilled before the first token: the time after it is rounds only

    def propose(self, tokens: list[int], k: int) -> tuple[list[int], list[np.ndarray]]:
        # The cache forgets the drafts the last round rejected, then catches up with the committed
        # tokens it has not seen (the last one, or the last two after a round that accepted everything).
        self.session.crop(len(tokens) - 1)
        drafted, q = [], []
        while len(drafted) < k and not (drafted and drafted[-1] in self.stop):
            seen = tokens + drafted
            q.append(distribution(self.session.feed(seen[self.session.length:], keep=1)[-1], self.gen))
            drafted.append(sample(q[-1], self.rng))
        return drafted, q


@dataclass(frozen=True)
class NgramDraft:
    """Prompt lookup, no draft model: propose what followed the most recent earlier occurrence
    of the text's last n tokens (prompt and output so far; n from max_ngram down to min_ngram),
    as transformers' `prompt_lookup_num_tokens` and vLLM's ngram speculator do. It pays where
    the output repeats the prompt (summaries, edits, quotes) or itself, and costs a search, not
    a forward pass. It shares the target's tokens by construction."""

    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise UserError(f"n-gram sizes need 1 <= min <= max (got min {self.min_ngram}, max {self.max_ngram})")

    def __str__(self) -> str:
        return f"ngram:{self.max_ngram}" + (f",min{self.min_ngram}" if self.min_ngram > 1 else "")

    def lookup(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram; [] if none."""
        seq = np.asarray(tokens)
        last = len(seq) - 1
        # hits[e]: the text's last n tokens also end at e < last. n = 1, 2, ...: the hits of n-1
        # whose n-th token back matches too; the longest n with a hit wins, its latest e.
        hits = seq[:-1] == seq[-1]
        found = None
        for n in range(1, min(self.max_ngram, last) + 1):
            if n > 1:
                hits[:n - 1] = False  # no n-gram ends before its n-th token
                hits[n - 1:] &= seq[:last - n + 1] == seq[last - n + 1]
            ends = np.flatnonzero(hits)
            if not ends.size:
                break
            if n >= self.min_ngram:
                found = int(ends[-1])
        return [] if found is None else seq[found + 1:found + 1 + k].tolist()


class NgramProposer:
    """An NgramDraft's lookups with q_i one-hot at x_i (the proposal is certain): the rule in
    `accept` then accepts x_i with probability p_i(x_i) and after a rejection draws from
    max(0, p_i - onehot) = p_i without x_i, renormalised: still exactly p_i."""

    def __init__(self, ngram: NgramDraft, vocab_size: int, stop: frozenset):
        self.ngram, self.vocab_size, self.stop = ngram, vocab_size, stop
        self.seq = np.zeros(0, dtype=np.int64)  # the tokens so far, as an array

    def propose(self, tokens: list[int], k: int) -> tuple[list[int], list[np.ndarray]]:
        # Committed tokens only grow: convert just the new ones (the whole list costs ~50 ns a token a round).
        self.seq = np.concatenate([self.seq, np.asarray(tokens[len(self.seq):], dtype=np.int64)])
        drafted = self.ngram.lookup(self.seq, k)
        ends = [i + 1 for i, t in enumerate(drafted) if t in self.stop]
        drafted = drafted[:ends[0]] if ends else drafted  # never past an EOS
        q = np.zeros((len(drafted), self.vocab_size))
        q[np.arange(len(drafted)), drafted] = 1.0
        return drafted, list(q)


# ---------------------------------------------------------------- the loop


def accept(drafted: list[int], q: list[np.ndarray], p: list[np.ndarray], rng: np.random.Generator) -> tuple[int, int]:
    """The acceptance rule: (how many drafted tokens are accepted, the token gained after them).

    Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)) (u < ratio, u ~ U[0, 1)), stopping at
    the first rejection; greedy (one-hot p and q): accept while x_i is the target's argmax. Then
    always gain one target token: after a rejection at i, drawn from the residual
    r = max(0, p_i - q_i) / sum(max(0, p_i - q_i)). Since P(reject) = 1 - sum(min(p_i, q_i))
    = sum(max(0, p_i - q_i)):  P(x) = q_i(x) min(1, p_i(x)/q_i(x)) + P(reject) r(x)
    = min(p_i, q_i)(x) + max(0, p_i(x) - q_i(x)) = p_i(x), the target's distribution (greedy: the
    target's argmax). All accepted: the bonus token from p_{n+1}. `p` has n + 1 rows.
    """
    n, accepted = len(drafted), 0
    while accepted < n and rng.random() * q[accepted][drafted[accepted]] < p[accepted][drafted[accepted]]:
        accepted += 1
    if accepted < n:
        residual = np.maximum(p[accepted] - q[accepted], 0.0)
        return accepted, sample(residual if residual.sum() > 0 else p[accepted], rng)  # > 0 whenever p_i != q_i
    return accepted, sample(p[n], rng)


def check(draft, vocab_size: int, num_draft: int) -> None:
    """What speculating with `draft` needs, checked once, before a batch takes any request."""
    if num_draft < 1:
        raise UserError(f"the number of draft tokens must be at least 1 (got {num_draft})")
    if not isinstance(draft, NgramDraft) and draft.vocab_size != vocab_size:
        raise UserError(f"draft vocabulary ({draft.vocab_size}) differs from the target's ({vocab_size})")


def check_request(gen: GenerationConfig) -> None:
    """A request that asked for speculative decoding itself (stream(draft=...)): penalties would
    make each drafted position depend on the drafts before it, which the rule does not model. (A
    server started with --draft decodes such a request plainly instead.)"""
    if uses_history(gen):
        raise UserError("repetition, presence and frequency penalties are not supported with speculative decoding")


def proposer(draft, vocab_size: int, prompt_ids: list[int], gen: GenerationConfig, rng: np.random.Generator,
             stop: frozenset) -> Proposer:
    """One request's proposer: prompt lookup for an NgramDraft, else the draft model on its own KV
    session (prefilled with the prompt here), sampling with the request's generator `rng`."""
    if isinstance(draft, NgramDraft):
        return NgramProposer(draft, vocab_size, stop)
    return ModelProposer(draft, prompt_ids, gen, rng, stop)
