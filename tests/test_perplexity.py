"""billion perplexity: lm-eval's rolling windows, the number against a direct computation from
Backend.logits, both engines agreeing, and the command's records. Tiny models, offline."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

from backends.scoring import log_softmax
from billion.tasks import perplexity as ppl
from billion.cli import cli
from billion.tasks.eval import rolling_windows
from billion.records.store import read_records

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "Many hands make light work, and every cloud has a silver lining. ") * 2


def direct(backend, text, ctx, stride):
    """Every token's log-probability given the up-to-(ctx - 1)-token window before it that the
    scheme promises: the first ctx tokens after the prefix, then `stride` at a time."""
    ids = backend.tokenize(text, add_special_tokens=False)
    seq = [backend.prefix_token_id] + ids  # seq[k + 1] is token k
    total, k = [], 0
    while k < len(ids):
        n = min(ctx, len(ids)) if k == 0 else min(stride, len(ids) - k)
        end = k + n  # score tokens k .. end-1, with the window ending at token end - 1
        start = max(0, end - ctx) if k else 0  # window = seq[start : end] (ctx tokens at most)
        logits = backend.logits(seq[start:end])
        logp = log_softmax(logits)
        for j in range(k, end):
            total.append(logp[j - start, ids[j]])  # row j - start (seq[j]) predicts token j
        k = end
    return np.array(total)


def test_windows_score_every_token_once(tiny_model):
    b = tiny_model("torch")
    ids = b.tokenize(TEXT, add_special_tokens=False)
    for ctx, stride in ((16, 16), (16, 5), (len(ids) + 5, 3)):
        wins, _, _ = ppl.plan(b, TEXT, ppl.PerplexityConfig(ctx=ctx, stride=stride))
        assert [t for _, cont in wins for t in cont] == ids
        assert all(len(c) + len(x) - 1 <= ctx for c, x in wins)
        assert wins[0][0] == [b.prefix_token_id]
    assert rolling_windows([1, 2, 3], 0, 2, 1) == [([0], [1, 2]), ([1, 2], [3])]  # row = ctx + cont[:-1]


@pytest.mark.parametrize("ctx,stride", [(512, None), (16, None), (16, 6)])
def test_perplexity_equals_a_direct_computation(tiny_model, ctx, stride):
    b = tiny_model("torch")
    result = ppl.measure(b, TEXT, ppl.PerplexityConfig(ctx=ctx, stride=stride))
    expected = direct(b, TEXT, min(ctx, b.context_length), stride or min(ctx, b.context_length))
    assert np.allclose(result.logprobs, expected, atol=1e-4)
    m = result.metrics()
    assert m["tokens_scored"] == len(b.tokenize(TEXT, add_special_tokens=False))
    assert m["perplexity"] == pytest.approx(math.exp(-expected.mean()), rel=1e-5)


def test_engines_agree(tiny_model):
    cfg = ppl.PerplexityConfig(ctx=16, stride=8)
    a, b = (ppl.measure(tiny_model(e), TEXT, cfg) for e in ("torch", "mlx"))
    agree = ppl.agreement(a, b)
    assert agree["tokens_compared"] == len(a.logprobs) and agree["max_abs_token_logprob_diff"] < 1e-3
    assert a.metrics()["perplexity"] == pytest.approx(b.metrics()["perplexity"], rel=1e-4)


def test_cli_both_engines_records(tmp_path, results_dir):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    r = CliRunner().invoke(cli, ["perplexity", "-m", "tiny:tinyllama", "-b", "all", "--dtype", "float32",
                                 "--text", str(text), "--ctx", "16", "--stride", "8", "--results-dir", str(results_dir)])
    assert r.exit_code == 0, r.output
    recs = read_records([results_dir])
    runs = {x["backend"]: x for x in recs if x["task"] == "perplexity"}
    assert set(runs) == {"mlx", "torch"}
    for rec in runs.values():
        assert rec["config"]["ctx"] == 16 and rec["config"]["stride"] == 8 and "rolling" in rec["config"]["windowing"]
        assert rec["metrics"]["tokens_scored"] > 0 and rec["metrics"]["perplexity"] > 1
    (agree,) = [x for x in recs if x["task"] == "perplexity_agreement"]
    assert agree["metrics"]["max_abs_token_logprob_diff"] < 1e-3


def test_bad_stride_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(cli, ["perplexity", "-m", "tiny:tinyllama", "-b", "torch", "--ctx", "8", "--stride", "9",
                                 "--results-dir", str(tmp_path)])
    assert r.exit_code == 1 and "--stride must be 1 to --ctx (8)" in r.output
