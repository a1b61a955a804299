"""The one sampling rule (backends/sampling.py) against a direct computation, the shared KV-session
loop, stop strings in the text stream, and both tiny engines drawing the same tokens."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from backends import sampling
from backends.types import GenerationConfig, UserError
from tests.conftest import ENGINES
from tests.doubles import FixedLogits, scheduled

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 0.3, 1.7, -0.4], dtype=np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def by_hand(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0, presence=0.0, frequency=0.0,
            prompt=(), output=()):
    """The rule of backends/sampling.py's docstring, written out token by token in plain Python."""
    x = [float(v) for v in logits]
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in range(len(x)):
        c = list(output).count(t)
        x[t] -= frequency * c + presence * (c > 0)
    if temperature == 0:
        best = max(range(len(x)), key=lambda t: (x[t], -t))
        return np.eye(len(x))[best]
    e = [math.exp(v / temperature) for v in x]
    p = [v / sum(e) for v in e]
    ranked = sorted(range(len(p)), key=lambda t: (-p[t], t))
    kept = ranked[:top_k] if top_k else ranked
    if top_p < 1.0:
        mass, nucleus, total = 0.0, [], sum(p[t] for t in kept)
        for t in kept:
            if mass >= top_p:
                break
            nucleus.append(t)
            mass += p[t] / total
        kept = nucleus
    kept = [t for t in kept if p[t] >= min_p * max(p)]
    out = np.zeros(len(p))
    for t in kept:
        out[t] = p[t]
    return out / out.sum()


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=3),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.3),
    dict(temperature=0.9, top_k=5, top_p=0.9, min_p=0.1),
    dict(temperature=1.0, rep=1.5, prompt=(0, 4), output=(6, 6, 2)),
    dict(temperature=1.0, presence=0.5, frequency=0.25, prompt=(1,), output=(0, 0, 0, 6)),
    dict(temperature=0.0, rep=3.0, prompt=(0,), output=()),  # greedy on the penalized logits: token 6
    dict(temperature=0.8, top_k=4, rep=1.2, presence=0.3, frequency=0.1, prompt=(0, 1), output=(6, 3, 3)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_distribution_is_exactly_the_rule(case):
    gen = GenerationConfig(temperature=case["temperature"], top_k=case.get("top_k", 0), top_p=case.get("top_p", 1.0),
                           min_p=case.get("min_p", 0.0), repetition_penalty=case.get("rep", 1.0),
                           presence_penalty=case.get("presence", 0.0), frequency_penalty=case.get("frequency", 0.0))
    got = sampling.distribution(LOGITS, gen, case.get("prompt", ()), case.get("output", ()))
    want = by_hand(LOGITS, **case)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert (got == 0).sum() == (want == 0).sum()  # the same tokens removed


def test_greedy_with_penalty_picks_the_penalized_argmax():
    gen = GenerationConfig(temperature=0.0, repetition_penalty=3.0)
    assert int(np.argmax(sampling.distribution(LOGITS, gen, (0,), ()))) == 6


def test_the_scheduler_draws_from_the_rule():
    engine = FixedLogits(LOGITS)
    gen = GenerationConfig(max_tokens=6, temperature=0.9, top_k=5, min_p=0.1, seed=3)
    # exactly the draws of the rule with numpy's generator seeded with gen.seed, penalties included
    for g in (gen, replace(gen, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)):
        rng, out = np.random.default_rng(g.seed), []
        for _ in range(g.max_tokens):
            out.append(sampling.sample(sampling.distribution(LOGITS, g, [1, 2], out), rng))
        assert [t for t, _ in scheduled(engine, [1, 2], g)] == out
    # and the frequencies follow p (i.i.d. draws without penalties)
    counts = np.zeros(len(LOGITS))
    for seed in range(400):
        for t, _ in scheduled(engine, [0], replace(gen, seed=seed, max_tokens=5)):
            counts[t] += 1
    p = sampling.distribution(LOGITS, gen)
    assert counts[p == 0].sum() == 0
    expected = counts.sum() * p
    stat = float((((counts - expected) ** 2)[p > 0] / expected[p > 0]).sum())
    assert stat < 20.5  # chi-square, 4 degrees of freedom: p-value ~4e-4


@pytest.mark.parametrize("gen", [
    GenerationConfig(max_tokens=24, temperature=0.9, top_k=20, seed=1, ignore_eos=True),
    GenerationConfig(max_tokens=24, temperature=1.0, min_p=0.05, repetition_penalty=1.3, seed=2, ignore_eos=True),
    GenerationConfig(max_tokens=24, temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5, ignore_eos=True),
], ids=["top-k", "min-p+repetition", "greedy+penalties"])
def test_both_engines_draw_the_same_tokens(tiny_model, gen):
    ids = tiny_model("torch").tokenize("Why is the sky blue? Sunlight scatters off")
    outs = [tiny_model(e).generate(ids, gen) for e in ENGINES]
    assert len(outs[0]) == 24 and outs[0] == outs[1]
    assert outs[0] != tiny_model("torch").generate(ids, replace(gen, seed=(gen.seed or 0) + 10, temperature=1.0))


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_strings_end_the_text(tiny_model, engine):
    backend = tiny_model(engine)
    ids = backend.tokenize("Why is the sky blue? Sunlight scatters off")
    gen = GenerationConfig(max_tokens=30, ignore_eos=True)
    full = "".join(c.text for c in backend.stream(ids, gen))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    chunks = list(backend.stream(ids, replace(gen, stop=("never there", stop))))
    assert "".join(c.text for c in chunks) == full[:full.find(stop)]
    assert chunks[-1].finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert [c.token for c in chunks] == backend.generate(ids, gen)[:len(chunks)]  # same tokens, none lost
    # a stop string that never completes: the held-back text is delivered at the end
    chunks = list(backend.stream(ids, replace(gen, stop=(full[-2:] + "\x00",))))
    assert "".join(c.text for c in chunks) == full and chunks[-1].finish_reason == "max_tokens"


def test_penalties_are_refused_with_a_draft(tiny_model):
    from backends.speculation import NgramDraft

    backend = tiny_model("torch")
    with pytest.raises(UserError, match="penalties are not supported with speculative decoding"):
        backend.generate(backend.tokenize("a a a"), GenerationConfig(max_tokens=4, repetition_penalty=1.2),
                         draft=NgramDraft())


def test_chat_cli_sampling_options_same_on_both_engines(tiny_folder, results_dir):
    from billion.cli import cli

    args = ["chat", "-m", str(tiny_folder("tinyllama")), "-b", "all", "--device", "cpu", "--dtype", "float32",
            "-p", "Why is the sky blue?", "-n", "16", "-t", "0.8", "--top-k", "10", "--min-p", "0.02",
            "--repetition-penalty", "1.2", "--seed", "7", "--json", "--results-dir", str(results_dir)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[0]["reply_token_ids"] == records[1]["reply_token_ids"]
    assert records[0]["config"]["top_k"] == 10 and records[0]["config"]["repetition_penalty"] == 1.2
    text = records[0]["reply"]
    if len(text) > 4:  # a stop string cuts the reply there
        stop = text[2:4]
        args += ["--stop", stop]
        result = CliRunner().invoke(cli, args)
        cut = [json.loads(line) for line in result.stdout.splitlines()]
        assert cut[0]["reply"] == text[:text.find(stop)].rstrip() or cut[0]["reply"] == text[:text.find(stop)]
        assert cut[0]["metrics"]["stop"] == "stop_string"


def test_sampling_never_leaves_the_vocabulary():
    """Logits or settings that would make the distribution NaN are an error for that request, never
    a token id equal to the vocabulary size (which the engine would then feed), on every path: the
    rule itself, and the scheduler alone (a batch of one) or with neighbours (fixed-logits engines)."""
    from backends.batching import BatchGenerator
    from backends.sampling import MIN_TEMPERATURE, SamplingError, distribution, normalized, sample
    from backends.sessions import SessionBatchCache
    from tests.doubles import FixedBatch, FixedLogits

    logits = np.array([1.0, 3.0, 2.0, 0.5], dtype=np.float32)
    rng = np.random.default_rng(0)
    # a vanishing temperature is greedy, not an overflow
    tiny = GenerationConfig(temperature=1e-30, max_tokens=3)
    assert normalized(tiny).temperature == 0.0 and MIN_TEMPERATURE > 1e-30
    assert [t for t, _ in scheduled(FixedLogits(logits), [0], tiny)] == [1, 1, 1]
    # non-finite logits (an engine's overflow) and empty weights: a SamplingError, not id 4
    for bad in ([np.nan, 1.0, 2.0, 0.0], [np.inf, 1.0, 2.0, 0.0], [-np.inf] * 4):
        with pytest.raises(SamplingError):
            sample(distribution(np.array(bad), GenerationConfig(temperature=0.7)), rng)
    with pytest.raises(SamplingError):
        sample(np.zeros(4), rng)
    one = BatchGenerator(SessionBatchCache(FixedLogits([np.nan, 1.0, 2.0, 0.5])), frozenset(), max_batch=1)
    one.add([0], GenerationConfig(temperature=0.7))
    (event,) = one.step()
    assert event.token is None and event.finish_reason == "error" and isinstance(event.error, SamplingError)

    class Broken(FixedBatch):  # row 1's logits are broken
        def decode(self, tokens):
            out = super().decode(tokens)
            out[1:2] = np.nan
            return out

    batch = BatchGenerator(Broken(logits), frozenset(), max_batch=4, prompt_cache_size=0)
    good = batch.add([0], GenerationConfig(max_tokens=3))
    broken = batch.add([0], GenerationConfig(max_tokens=3))
    events = []
    while batch.busy:
        events += batch.step()
    assert [e.token for e in events if e.uid == good] == [1, 1, 1]  # the batch goes on without it
    (err,) = [e for e in events if e.uid == broken and e.finish_reason]
    assert err.finish_reason == "error" and "not finite" in str(err.error)
    assert all(e.token is None or 0 <= e.token < 4 for e in events)


def test_logprobs_of_many_positions_equal_logprobs_position_by_position():
    from backends.sampling import logprobs, logprobs_of

    def reference(row, token, top):  # log-softmax in float64, the top by a stable sort (ties: lower id)
        x = np.asarray(row, np.float64)
        lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        return float(lp[token]), tuple((int(i), float(lp[i])) for i in np.argsort(-lp, kind="stable")[:top])

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 50)).astype(np.float32)
    logits[7, :3] = 5.0  # a tie at the top: the lower id first
    tokens = rng.integers(0, 50, size=300)
    for top in (0, 1, 5):
        want = [reference(logits[i], int(t), top) for i, t in enumerate(tokens)]
        assert logprobs_of(logits, tokens, top, rows_at_once=64) == want
        assert [logprobs(logits[i], int(t), top) for i, t in enumerate(tokens)] == want


def test_top_k_and_top_p_without_a_full_sort_keep_the_sorted_rules_tokens():
    """most_probable/nucleus_order (a partition, then a sort of the candidates) give the tokens a
    full stable argsort gives: ties by lower id, zeros, flat and peaked distributions."""
    rng = np.random.default_rng(0)
    cases = [(rng.normal(0, s, 5000), None) for s in (0.1, 1.0, 8.0)]
    cases.append((np.repeat(rng.normal(0, 1, 50), 100), None))  # every value 100 times: ties everywhere
    allowed = np.ones(5000, bool)
    allowed[rng.choice(5000, 4000, replace=False)] = False  # 4000 tokens a grammar forbids: zeros
    cases.append((rng.normal(0, 3, 5000), allowed))
    for logits, allowed in cases:
        for gen in (GenerationConfig(temperature=0.9, top_k=k, top_p=p) for k in (0, 1, 7, 100, 4999)
                    for p in (1.0, 0.5, 0.9, 0.999)):
            x = np.where(allowed, logits, -np.inf) if allowed is not None else np.asarray(logits, np.float64)
            x = x / gen.temperature
            want = np.exp(x - x.max())
            want /= want.sum()
            keep = np.ones(len(want), bool)
            if gen.top_k:
                keep[np.argsort(-want, kind="stable")[gen.top_k:]] = False
            if gen.top_p < 1.0:
                q = np.where(keep, want, 0.0)
                q /= q.sum()
                order = np.argsort(-q, kind="stable")
                keep[order[np.cumsum(q[order]) - q[order] >= gen.top_p]] = False
            want = np.where(keep, want, 0.0)
            want /= want.sum()
            got = sampling.distribution(logits, gen, allowed=allowed)
            np.testing.assert_array_equal(got > 0, want > 0)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
