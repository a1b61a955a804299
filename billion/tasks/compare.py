"""Comparing engines: parity of their next-token distributions, and speed ratios."""

from __future__ import annotations

import numpy as np

from backends.scoring import log_softmax


def kl_per_position(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p || q) of each row, from log-probabilities [positions, vocab]."""
    return (np.exp(logp) * (logp - logq)).sum(-1)


def parity(logits_a: np.ndarray, logits_b: np.ndarray, tokens_a: list[int], tokens_b: list[int]) -> dict:
    """Two engines' logits on the same token sequence (teacher-forced), and their greedy outputs.

    Returns top-1 agreement, max |logit difference|, mean and max KL(a || b) of
    the next-token distributions, and the index of the first token where the
    greedy generations differ (None when they never do).
    """
    n = min(len(logits_a), len(logits_b))
    vocab = min(logits_a.shape[-1], logits_b.shape[-1])
    a, b = logits_a[:n, :vocab].astype(np.float64), logits_b[:n, :vocab].astype(np.float64)
    la, lb = log_softmax(a), log_softmax(b)
    kl = kl_per_position(la, lb)
    diverge = next((i for i, (x, y) in enumerate(zip(tokens_a, tokens_b)) if x != y), None)
    if diverge is None and len(tokens_a) != len(tokens_b):
        diverge = min(len(tokens_a), len(tokens_b))
    return {
        "positions": n,
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "max_abs_logit_diff": float(np.abs(a - b).max()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "greedy_tokens_compared": min(len(tokens_a), len(tokens_b)),
        "first_greedy_divergence": diverge,
    }


# Metrics where bigger is better / smaller is better, for ratio tables.
HIGHER_IS_BETTER = ("prefill_tps", "decode_tps", "bandwidth_fraction")
LOWER_IS_BETTER = ("ttft_s", "peak_memory_gb", "weight_gb")


def ratios(metrics_a: dict, metrics_b: dict) -> dict:
    """b / a for each shared numeric metric. Peak memory is divided only when both
    numbers come from the same kind of counter (RSS and an allocator peak are not the same thing)."""
    out = {}
    for key in HIGHER_IS_BETTER + LOWER_IS_BETTER:
        x, y = metrics_a.get(key), metrics_b.get(key)
        if key == "peak_memory_gb" and metrics_a.get("memory_source") != metrics_b.get("memory_source"):
            continue
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x:
            out[key] = y / x
    return out
