"""Perplexity of a text, windowed as lm-evaluation-harness's rolling log-likelihood.

The text is tokenized without special tokens and cut into windows of at most `ctx` tokens
(lm-eval's `get_rolling_token_windows` + `make_disjoint_window`, billion.tasks.eval.rolling_windows):

- the first window scores its tokens conditioned on the prefix token (BOS, else EOS) and the
  tokens before each;
- each later window scores the next `stride` tokens, conditioned on the ctx - stride tokens
  before them (the last window: on as many as fill ctx).

Every token is scored exactly once. stride = ctx (the default) is lm-eval's
`loglikelihood_rolling` exactly (disjoint windows, context_len=1); a smaller stride gives each
scored token more context (Hugging Face's "perplexity of fixed-length models" sliding window).
It is not llama-perplexity's windowing (which scores only each window's second half; see
billion/tasks/quality.py). Perplexity = exp(-sum log p / tokens scored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from backends.base import Backend
from backends.scoring import log_softmax
from backends.types import UserError
from billion.tasks.eval import rolling_windows

WINDOWING = ("lm-eval rolling log-likelihood (get_rolling_token_windows + make_disjoint_window): "
             "first window after the BOS/EOS prefix, then `stride` new tokens per window with ctx - stride "
             "tokens of context; every token scored once")


@dataclass(frozen=True)
class PerplexityConfig:
    ctx: int = 512  # window length in tokens (capped at the model's context)
    stride: int | None = None  # tokens scored per window after the first; None: ctx
    windowing: str = WINDOWING  # said in every record


@dataclass
class PerplexityResult:
    ctx: int = 0
    stride: int = 0
    scored: list = field(default_factory=list)  # one array of token log-probabilities per window scored

    @property
    def windows(self) -> int:
        return len(self.scored)

    @property
    def logprobs(self) -> np.ndarray:
        """float64, one per scored token, in text order."""
        return np.concatenate(self.scored) if self.scored else np.zeros(0)

    def metrics(self) -> dict:
        n = len(self.logprobs)
        nll = float(-self.logprobs.sum())
        return {"tokens_scored": n, "windows": self.windows, "ctx": self.ctx, "stride": self.stride,
                "nll_sum": nll, "nll_per_token": nll / n if n else None,
                "perplexity": math.exp(nll / n) if n else None}


def plan(backend: Backend, text: str, cfg: PerplexityConfig) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    """(windows as (context ids, scored ids), ctx, stride) for this text on this model."""
    ctx = min(cfg.ctx, backend.context_length)
    stride = ctx if cfg.stride is None else cfg.stride
    if ctx < 2:
        raise UserError(f"--ctx must be at least 2 tokens, not {ctx}")
    if not 1 <= stride <= ctx:
        raise UserError(f"--stride must be 1 to --ctx ({ctx}), not {stride}")
    ids = backend.tokenize(text, add_special_tokens=False)
    if not ids:
        raise UserError("the text has no tokens")
    return rolling_windows(ids, backend.prefix_token_id, ctx, ctx - stride + 1), ctx, stride


def measure(backend: Backend, text: str, cfg: PerplexityConfig,
            on_window: Callable[[int, int], None] | None = None,
            result: PerplexityResult | None = None) -> PerplexityResult:
    """Log-probability of every token of the text, window by window into the result (a caller that
    passes `result` keeps the windows already scored if Ctrl-C stops the run)."""
    wins, ctx, stride = plan(backend, text, cfg)
    result = result or PerplexityResult()
    result.ctx, result.stride = ctx, stride
    for i, (context, scored) in enumerate(wins):
        row = context + scored[:-1]
        logits = backend.session().feed(row, keep=len(scored))  # row t predicts scored[t]
        logp = log_softmax(logits)
        result.scored.append(logp[np.arange(len(scored)), scored])
        if on_window:
            on_window(i + 1, len(wins))
    return result


def agreement(a: PerplexityResult, b: PerplexityResult) -> dict:
    n = min(len(a.logprobs), len(b.logprobs))
    out = {"tokens_compared": n}
    if n:
        diff = np.abs(a.logprobs[:n] - b.logprobs[:n])
        out["max_abs_token_logprob_diff"] = float(diff.max())
        out["mean_abs_token_logprob_diff"] = float(diff.mean())
        out["ln_ppl_diff"] = float(-a.logprobs[:n].mean() + b.logprobs[:n].mean())
    return out
