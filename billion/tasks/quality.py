"""What quantization costs in quality: a quantized model against the same model in
full precision on the same engine, position by position over a fixed text.

Measured the way llama.cpp's `llama-perplexity --kl-divergence` does: the text is
cut into windows of `ctx` tokens, each evaluated from an empty cache (its first
token a BOS where the tokenizer adds one), and only the second half of each
window is scored, so every scored token has at least ctx/2 tokens of context.
At each scored position:

  KL(P_full || P_quant) = sum_v P_full(v) * (log P_full(v) - log P_quant(v))

reported as mean (with its standard error), median, 99th percentile and
maximum; top-1 agreement is the share of positions where both models' most
likely token is the same ("same top p" in llama.cpp); perplexity of the text
under each model, and the mean change in the probability of the true next token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from backends.base import Backend
from backends.scoring import log_softmax
from backends.types import UserError
from billion.tasks.compare import kl_per_position


@dataclass(frozen=True)
class QualityConfig:
    ctx: int = 512  # window length in tokens (capped at the model's context)
    chunks: int = 4  # windows evaluated at most, as llama-perplexity's --chunks


@dataclass
class Scored:
    """Full-vocabulary log-probabilities at the scored positions, and the true next tokens."""

    logp: np.ndarray  # [positions, vocab] float32
    targets: np.ndarray  # [positions] int


def default_text() -> str:
    return resources.files("billion").joinpath("data/quality_text.txt").read_text()


def read_text(path: str | Path | None) -> tuple[str, str]:
    """(text, label): a file the user names, or the fixed text shipped with billion."""
    if path is None:
        return default_text(), "billion/data/quality_text.txt"
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no text file {path}")
    text = p.read_text(errors="replace")
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text, str(p)


def windows(backend: Backend, text: str, cfg: QualityConfig) -> list[list[int]]:
    """The token windows to evaluate: consecutive, non-overlapping, each `ctx` long."""
    ctx = min(cfg.ctx, backend.context_length)
    if ctx < 4:
        raise UserError(f"--ctx must be at least 4 tokens, not {ctx}")
    ids = backend.tokenize(text, add_special_tokens=False)
    with_specials = backend.tokenize("x")
    bos = with_specials[:len(with_specials) - len(backend.tokenize("x", add_special_tokens=False))]
    body = ctx - len(bos)
    out = [bos + ids[i:i + body] for i in range(0, len(ids) - body + 1, body)][: cfg.chunks]
    if not out:
        raise UserError(f"the text has {len(ids)} tokens: fewer than one window of {ctx}; "
                        f"use a longer text or a smaller --ctx")
    return out


def score(backend: Backend, wins: list[list[int]], on_window: Callable[[int], None] | None = None) -> Scored:
    """Log-probabilities of the second half of every window (each from an empty cache)."""
    logps, targets = [], []
    for i, win in enumerate(wins):
        first = len(win) // 2
        logits = backend.session().feed(win)  # [len, vocab]: row t predicts token t + 1
        logps.append(log_softmax(logits[first - 1:-1]).astype(np.float32))
        targets.append(np.asarray(win[first:]))
        if on_window:
            on_window(i + 1)
    return Scored(np.concatenate(logps), np.concatenate(targets))


def compare(base: Scored, quant: Scored) -> dict:
    """KL divergence, top-1 agreement and perplexities of `quant` against `base`."""
    if base.logp.shape != quant.logp.shape or not np.array_equal(base.targets, quant.targets):
        raise ValueError("the two models were not scored on the same tokens")
    lp, lq = base.logp.astype(np.float64), quant.logp.astype(np.float64)
    kl = kl_per_position(lp, lq)
    rows = np.arange(len(base.targets))
    nll_base, nll_quant = -lp[rows, base.targets], -lq[rows, base.targets]
    n = len(kl)
    return {
        "positions": n,
        "mean_kl": float(kl.mean()),
        "mean_kl_stderr": float(kl.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "median_kl": float(np.median(kl)),
        "p99_kl": float(np.percentile(kl, 99)),
        "max_kl": float(kl.max()),
        "top1_agreement": float((lp.argmax(-1) == lq.argmax(-1)).mean()),
        "ppl_full": float(np.exp(nll_base.mean())),
        "ppl_quant": float(np.exp(nll_quant.mean())),
        "ln_ppl_ratio": float(nll_quant.mean() - nll_base.mean()),
        "mean_delta_p": float((np.exp(-nll_quant) - np.exp(-nll_base)).mean()),
    }


@dataclass
class QualityResult:
    metrics: dict  # scheme -> compare() metrics, for the schemes compared
    evaluated: dict = field(default_factory=dict)  # "full" / scheme -> what `evaluate` returned


def measure(load: Callable[[str | None], Backend], schemes: list[str], text: str, cfg: QualityConfig, *,
            evaluate: Callable[[Backend], object] | None = None,
            on_step: Callable[[str, int, int], None] | None = None,
            result: QualityResult | None = None) -> QualityResult:
    """Score the text in full precision, then with each scheme.

    `load(scheme)` loads the model (scheme None: full precision); each model is
    closed before the next loads, so only one is in memory at a time.
    `evaluate(backend)` (e.g. an MMLU run) also runs on every model. Each scheme's
    comparison goes into the result when done (a caller that passes `result` keeps
    them if Ctrl-C stops the run).
    """
    result = result or QualityResult({})

    def scored(scheme: str | None) -> Scored:
        backend = load(scheme)
        try:
            wins = windows(backend, text, cfg)
            out = score(backend, wins, lambda i: on_step(scheme or "full", i, len(wins)) if on_step else None)
            if evaluate:
                result.evaluated[scheme or "full"] = evaluate(backend)
            return out
        finally:
            backend.close()

    base = scored(None)
    for scheme in schemes:
        result.metrics[scheme] = compare(base, scored(scheme))
    return result
