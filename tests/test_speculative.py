"""Speculative decoding on both engines: lossless (greedy and sampled), stats, pair checks, CLI;
with a draft model and with prompt lookup (n-gram drafts)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from backends.types import GenerationConfig, UserError
from backends.speculation import NgramDraft, NgramProposer, SpeculationStats, distribution
from tests.conftest import ENGINES
from tests.doubles import FixedLogits, scheduled

PROMPT = "Why is the sky blue? Sunlight scatters off"
# Random tiny weights rarely repeat themselves; from this prompt the greedy output does, once, on both engines.
REPEATING = "a a a a a a a a"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models are overhead-bound: on a shared 2-core machine two OpenMP threads spin
    against other processes and run ~50x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(billion_home):
    """(target folder, layers:1 draft folder, damped target folder, unrelated same-tokenizer folder)."""
    from backends.folders.synthetic import build_folder
    from billion.models import card_for
    from billion.tasks.speculate import prepare_pair

    plain = prepare_pair("tiny:tinyllama", "layers:1")
    damped = prepare_pair("tiny:tinyllama", "layers:1", damp=0.1)
    card = card_for("tinyllama")
    other = build_folder(billion_home / "models" / "tiny-tinyllama-seed1", card.config, card.family, tiny=True, seed=1)
    return plain.target.folder, plain.draft.folder, damped.target.folder, other


_models: dict = {}


@pytest.fixture(scope="module")
def model(pair):
    import backends

    names = dict(zip(("target", "layers1", "damped", "other"), pair))

    def get(engine: str, which: str):
        if (engine, which) not in _models:
            _models[engine, which] = backends.get(engine).load(names[which], device="cpu", dtype="float32")
        return _models[engine, which]

    return get


def greedy(max_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("draft_name", ["target", "other"])
def test_greedy_output_is_the_targets_for_every_k(model, engine, draft_name):
    target, draft = model(engine, "target"), model(engine, draft_name)
    ids = target.tokenize(PROMPT)
    reference = target.generate(ids, greedy(24))
    for k in range(1, 7):
        stats = SpeculationStats()
        chunks = list(target.stream(ids, greedy(24), draft=draft, num_draft=k, stats=stats))
        assert [c.token for c in chunks] == reference, f"k={k}"
        # every token is the prefill's first one, an accepted draft, or a round's (or a last plain step's) own
        assert sum(c.from_draft for c in chunks) == stats.accepted
        assert len(chunks) - 1 - stats.accepted - stats.rounds in (0, 1)
        assert sum(stats.histogram) == stats.rounds and stats.drafted <= k * stats.rounds
        if draft_name == "target":
            assert stats.acceptance == 1.0 and stats.rejections == 0
        else:  # another seed: unrelated weights, same tokenizer
            assert stats.acceptance < 0.3


@pytest.mark.parametrize("engine", ENGINES)
def test_eos_and_max_tokens_inside_a_drafted_block(model, engine):
    from backends.folders import hf_folder

    target = model(engine, "target")
    ids = target.tokenize(PROMPT)
    free = target.generate(ids, greedy(20))
    # A self-draft accepts everything: tokens 1..4 come from round one's drafted block (k=4).
    for m in range(1, 8):
        stats = SpeculationStats()
        assert target.generate(ids, greedy(m), draft=target, num_draft=4, stats=stats) == free[:m]
        assert stats.drafted <= m - 1  # never drafts past max_tokens
    j = next(i for i in range(2, 5) if free[i] not in free[:i])
    object.__setattr__(target, "eos_ids", frozenset({free[j]}))
    try:
        stats = SpeculationStats()
        out = target.generate(ids, GenerationConfig(max_tokens=20), draft=target, num_draft=4, stats=stats)
        assert out == free[:j] == target.generate(ids, GenerationConfig(max_tokens=20))
        assert stats.rounds == 1 and stats.drafted == j  # drafting stopped at the EOS it proposed
    finally:
        target.eos_ids = hf_folder.eos_ids(target.path, target.tokenizer)


def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's test, bins with expected count < 5 pooled; p-value by Wilson-Hilferty (no scipy here)."""
    if observed[expected == 0].any():
        return 0.0  # a token that cannot occur did
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _second_token_distribution(backend, ids: list[int], gen: GenerationConfig) -> np.ndarray:
    """Exact marginal of the second generated token: sum over t0 of p(t0) p(. | t0)."""
    session = backend.session()
    p0 = distribution(session.feed(ids, keep=1)[-1], gen)
    out = np.zeros_like(p0)
    for t0 in np.flatnonzero(p0 > 1e-6):
        out += p0[t0] * distribution(session.feed([int(t0)], keep=1)[-1], gen)
        session.crop(len(ids))
    return out / out.sum()


@pytest.mark.parametrize("engine", ENGINES)
def test_sampled_tokens_follow_the_targets_distribution(model, engine):
    """The second token is the first drafted position (the first comes from the prefill)."""
    target, draft = model(engine, "target"), model(engine, "layers1")
    ids = target.tokenize(PROMPT)
    n = 600
    counts, stats = np.zeros(target.vocab_size), SpeculationStats()
    for seed in range(n):
        gen = GenerationConfig(max_tokens=3, temperature=0.7, top_p=0.9, seed=seed, ignore_eos=True)
        counts[target.generate(ids, gen, draft=draft, num_draft=2, stats=stats)[1]] += 1
    assert 0.2 < stats.acceptance < 0.8  # both the acceptance and the residual path were taken
    assert _chi_square_p(counts, n * _second_token_distribution(target, ids, gen)) > 1e-3
    # the test can fail: the same draws are far from the draft's own distribution
    assert _chi_square_p(counts, n * _second_token_distribution(draft, ids, gen)) < 1e-6


def test_acceptance_rule_reproduces_the_target_exactly():
    """Many draws on a 6-token vocabulary: every drafted position must follow the target's p,
    not the draft's q (catches e.g. resampling from p instead of the residual max(0, p - q))."""
    target, draft = FixedLogits([2.0, 1.0, 0.5, 0.0, -1.0, 0.3]), FixedLogits([0.0, 1.5, 2.0, -1.0, 1.0, 0.0])
    gen = GenerationConfig(max_tokens=6, temperature=1.0, top_p=0.95, seed=0, ignore_eos=True)
    p = distribution(target.row, gen)
    counts, stats = np.zeros(6), SpeculationStats()
    for seed in range(3000):
        tokens = scheduled(target, [0], GenerationConfig(**{**gen.__dict__, "seed": seed}), draft, 3, stats)
        for token, _ in list(tokens)[1:]:  # the first token comes from the prefill
            counts[token] += 1
    assert 0.15 < stats.acceptance < 0.8
    assert _chi_square_p(counts, counts.sum() * p) > 1e-3
    assert _chi_square_p(counts, counts.sum() * distribution(draft.row, gen)) < 1e-6


def test_mismatched_vocabularies_are_refused_before_loading(tiny_folder):
    from billion.tasks.speculate import prepare_pair

    from billion.tasks.speculate import check_vocabularies
    from billion.models import parse_spec

    # the folders' own check: token strings compared id by id
    with pytest.raises(UserError, match=r"cannot draft for tiny:tinyllama: their tokenizers differ.*layers:N"):
        check_vocabularies(parse_spec("tiny:tinyllama"), tiny_folder("pythia-1b"), tiny_folder("tinyllama"),
                           "tiny:pythia-1b")
    # and the registry's, before anything is built or downloaded
    with pytest.raises(UserError, match="different families or sizes"):
        prepare_pair("tiny:tinyllama", "tiny:pythia-1b")
    with pytest.raises(UserError, match="different families or sizes"):
        prepare_pair("random:tinyllama", "tiny:tinyllama")
    # registered models with different tokenizers: refused before any download (tests are offline)
    with pytest.raises(UserError, match="different tokenizers.*pythia-1b -> pythia-2.8b"):
        prepare_pair("pythia-1b", "tinyllama")
    with pytest.raises(UserError, match="1 <= N < 2"):
        prepare_pair("tiny:tinyllama", "layers:2")
    with pytest.raises(UserError, match="--damp is for random"):
        prepare_pair("tiny:tinyllama", "tiny:tinyllama", damp=0.1)


def test_compatible_pairs_come_from_the_registry():
    from billion.models import MODELS, parse_spec
    from billion.tasks.speculate import compatible_pairs, prepare_pair

    assert "llama-3.2-1b" in compatible_pairs(parse_spec("meta-llama/Llama-3.1-8B-Instruct"))
    assert "tinyllama" in compatible_pairs(parse_spec("meta-llama/Llama-2-7b-chat-hf"))
    # a mismatched pair of registry models: one line under 300 characters naming every draft's pair
    for target, draft in (("pythia-1b", "tinyllama"), ("stablelm-2-1.6b", "llama-3.2-1b")):
        with pytest.raises(UserError) as e:
            prepare_pair(target, draft)
        message = str(e.value)
        assert "\n" not in message and len("Error: " + message) < 300, message
        assert all(f"{c.alias} -> " in message for c in MODELS.values() if c.drafts_for), message


def test_layer_draft_and_damped_target_folders(pair):
    from backends.folders import hf_folder
    from safetensors.torch import load_file

    target, draft, damped, _ = pair
    assert hf_folder.read_config(draft)["num_hidden_layers"] == 1
    t, d, z = (load_file(f / "model.safetensors") for f in (target, draft, damped))
    assert set(d) == {k for k in t if ".layers.1." not in k}
    for name in t:
        scale = 0.1 if ".layers.1." in name and ("o_proj" in name or "down_proj" in name) else 1.0
        assert np.allclose(z[name].numpy(), scale * t[name].numpy()), name


@pytest.mark.parametrize("engine", ENGINES)
def test_damping_makes_a_shallow_draft_agree(model, engine):
    target, draft = model(engine, "damped"), model(engine, "layers1")
    ids = target.tokenize(PROMPT)
    stats = SpeculationStats()
    assert target.generate(ids, greedy(24), draft=draft, num_draft=3, stats=stats) == target.generate(ids, greedy(24))
    assert stats.acceptance > 0.5


def test_theory():
    from billion.tasks.speculate import expected_tokens, leviathan_alpha, measured_prediction, predicted_speedup

    assert expected_tokens(0.0, 4) == 1 and expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    assert predicted_speedup(3.0, 4, 0.25) == pytest.approx(1.5)
    s = SpeculationStats()
    s.record(4, 4)
    s.record(4, 1)
    assert (s.rounds, s.drafted, s.accepted, s.rejections, s.histogram) == (2, 8, 5, 1, [0, 1, 0, 0, 1])
    assert s.acceptance == 5 / 8 and leviathan_alpha(s) == 5 / 6
    # the counts' prediction, model draft: (1 + accepted per round) / (drafted per round * c + verify)
    assert measured_prediction(s, drafting=8 * 0.25, verify_cost=1.5) == pytest.approx((1 + 5 / 2) / (4 * 0.25 + 1.5))
    s.record(0, 0)  # a lookup that found nothing: one target step, one token
    assert (s.rounds, s.no_match, s.acceptance) == (2, 1, 5 / 8)
    assert measured_prediction(s, drafting=0.3, verify_cost=1.5) == pytest.approx((5 + 3) / (0.3 + 2 * 1.5 + 1))


def test_cli_speculate_both_engines(tiny_folder, tmp_path):
    from billion.cli import cli

    out = tmp_path / "results"
    r = CliRunner().invoke(cli, ["speculate", "-b", "all", "--target", "tiny:tinyllama", "--draft", "layers:1",
                                 "--damp", "0.1", "--k", "2,1", "-n", "12", "--runs", "1", "--warmup", "0",
                                 "--results-dir", str(out)])
    assert r.exit_code == 0, r.output
    records = [json.loads(f.read_text()) for f in sorted(out.glob("speculate-*.json"))]
    assert sorted(rec["backend"] for rec in records) == ["mlx", "torch"]
    for rec in records:
        m = rec["metrics"]
        assert rec["config"]["ks"] == [1, 2]
        assert m["best_k"] == max((1, 2), key=lambda k: m["per_k"][str(k)]["speedup"])
        for k in ("1", "2"):
            per = m["per_k"][k]
            assert per["greedy_same_as_target"] is True and 0.5 < per["acceptance"] <= 1
            assert per["speedup"] > 0 and per["predicted_speedup"] > 0 and per["verify_cost_target_steps"] > 0
    assert "Leviathan" in r.output and "layers >= 1 damped x0.1" in r.output
    bad = CliRunner().invoke(cli, ["speculate", "--target", "tiny:tinyllama", "--draft", "tiny:pythia-1b"])
    assert bad.exit_code == 1 and "cannot draft" in bad.output and "Traceback" not in bad.output


def test_cli_bench_with_a_draft(tiny_folder, tmp_path):
    from billion.cli import cli

    out = tmp_path / "results"
    r = CliRunner().invoke(cli, ["bench", "-m", "tiny:tinyllama", "-b", "all", "--draft", "layers:1", "--num-draft", "3",
                                 "-p", "8", "-n", "8", "-r", "1", "--warmup", "0", "--no-parity",
                                 "--results-dir", str(out)])
    assert r.exit_code == 0, r.output
    records = [json.loads(f.read_text()) for f in sorted(out.glob("bench-*.json"))]
    assert sorted(rec["backend"] for rec in records) == ["mlx", "torch"]
    assert all(rec["config"]["draft"] == "layers:1" and rec["config"]["num_draft"] == 3 for rec in records)
    bad = CliRunner().invoke(cli, ["bench", "-m", "tiny:tinyllama", "--draft", "tiny:pythia-1b"])
    assert bad.exit_code == 1 and "cannot draft" in bad.output


# ---------------------------------------------------------------- prompt lookup (n-gram drafts)


def _lookup_by_hand(tokens: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The definition, slowly: the longest suffix n-gram, its latest earlier occurrence, what followed."""
    for n in range(max_ngram, min_ngram - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[len(tokens) - n:]:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_draft_proposes_what_followed_the_latest_earlier_occurrence():
    draft = NgramDraft(max_ngram=3)
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3]
    assert draft.lookup(tokens, 2) == [7, 8]  # the later of the two earlier [1, 2, 3]
    assert draft.lookup(tokens, 9) == [7, 8, 4, 1, 2, 3]  # up to the end of the text
    tokens = [4, 5, 6, 0, 6, 1, 4, 5, 6]
    assert draft.lookup(tokens, 2) == [0, 6]  # the longest n-gram first, though [6] occurs later
    assert NgramDraft(max_ngram=1).lookup(tokens, 2) == [1, 4]
    assert draft.lookup([1, 2, 3], 4) == [] and draft.lookup([5], 4) == []  # the suffix itself does not count
    assert draft.lookup([4, 5, 6, 0, 6], 2) == [0, 6] and NgramDraft(3, min_ngram=2).lookup([4, 5, 6, 0, 6], 2) == []
    rng = np.random.default_rng(0)
    for _ in range(2000):
        tokens, k, n = rng.integers(0, 4, rng.integers(1, 24)).tolist(), int(rng.integers(6)), int(rng.integers(1, 5))
        assert NgramDraft(n).lookup(tokens, k) == _lookup_by_hand(tokens, k, n, 1), (tokens, k, n)
    # as a proposer: q one-hot at each proposed token, nothing past an EOS
    drafted, q = NgramProposer(draft, 10, frozenset({8})).propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3], 4)
    assert drafted == [7, 8] and np.array_equal(np.array(q), np.eye(10)[[7, 8]])
    with pytest.raises(UserError, match="1 <= min <= max"):
        NgramDraft(0)


@pytest.mark.parametrize("engine", ENGINES)
def test_ngram_draft_greedy_output_is_the_targets(model, engine):
    target = model(engine, "target")
    ids = target.tokenize(REPEATING)
    reference = target.generate(ids, greedy(32))
    for k in range(1, 7):
        stats = SpeculationStats()
        chunks = list(target.stream(ids, greedy(32), draft=NgramDraft(), num_draft=k, stats=stats))
        assert [c.token for c in chunks] == reference, f"k={k}"
        assert sum(c.from_draft for c in chunks) == stats.accepted
        # every round (found a match or not) gains accepted + 1 tokens; a last plain step may follow
        assert len(chunks) - 1 - stats.accepted - stats.rounds - stats.no_match in (0, 1)
        assert sum(stats.histogram) == stats.rounds and stats.drafted <= k * stats.rounds
        # all three paths taken: an accepted lookup, a rejected one, no match
        assert stats.accepted >= 1 and stats.rejections >= 1 and stats.no_match >= 1


def test_ngram_draft_sampled_tokens_follow_the_targets_distribution():
    """The prompt makes the first lookups propose tokens the target rarely or never draws
    (4 is outside the top-p nucleus): the output must still follow p, token by token."""
    target = FixedLogits([2.0, 1.0, 0.5, 0.0, -1.0, 0.3])
    gen = GenerationConfig(max_tokens=6, temperature=1.0, top_p=0.95, seed=0, ignore_eos=True)
    p = distribution(target.row, gen)
    counts, accepted, stats = np.zeros(6), np.zeros(6), SpeculationStats()
    for seed in range(3000):
        tokens = scheduled(target, [5, 5, 5, 5, 4, 4, 4, 4], replace(gen, seed=seed), NgramDraft(), 3, stats)
        for token, from_draft in list(tokens)[1:]:  # the first token comes from the prefill
            counts[token] += 1
            accepted[token] += from_draft
    assert 0.15 < stats.acceptance < 0.8 and stats.no_match > 0
    assert _chi_square_p(counts, counts.sum() * p) > 1e-3
    # the test can fail: the accepted proposals alone are far from p; the residual draws make up the rest
    assert _chi_square_p(accepted, accepted.sum() * p) < 1e-6


def test_cli_speculate_with_prompt_lookup(tiny_folder, tmp_path):
    from billion.cli import cli
    from billion.tasks.speculate import prepare_pair

    pair = prepare_pair("tiny:tinyllama", "ngram:2")
    assert pair.draft == NgramDraft(2) and pair.draft_label == "ngram:2"
    with pytest.raises(UserError, match="--damp is for random"):
        prepare_pair("tiny:tinyllama", "ngram", damp=0.1)
    out = tmp_path / "results"
    r = CliRunner().invoke(cli, ["speculate", "-b", "all", "--target", "tiny:tinyllama", "--draft", "ngram", "--k", "2",
                                 "-n", "16", "--runs", "1", "--warmup", "0", "--prompt", REPEATING,
                                 "--results-dir", str(out)])
    assert r.exit_code == 0, r.output
    records = [json.loads(f.read_text()) for f in sorted(out.glob("speculate-*.json"))]
    assert sorted(rec["backend"] for rec in records) == ["mlx", "torch"]
    for rec in records:
        assert rec["config"]["draft"] == rec["config"]["draft_label"] == "ngram:3"
        assert rec["draft_info"] == {"prompt_lookup": {"max_ngram": 3, "min_ngram": 1}}
        m = rec["metrics"]
        # no draft model: no draft-alone speed; the cost ratio is the measured lookup's, in target steps
        assert "draft_tps" not in m and rec["runs"]["draft_tps"] == []
        assert 0 < m["lookup_s"] < 0.01 and m["lookup_target_steps"] == pytest.approx(m["lookup_s"] * m["target_tps"])
        per = m["per_k"]["2"]
        assert per["cost_ratio"] == pytest.approx(m["lookup_target_steps"] / 2)
        assert per["greedy_same_as_target"] is True and per["no_match_rounds"] > 0
        assert per["predicted_speedup"] > 0 and per["predicted_speedup_leviathan"] > 0
    assert "no match" in r.output and "prompt lookup" in r.output
    bad = CliRunner().invoke(cli, ["speculate", "--target", "tiny:tinyllama", "--draft", "ngram:0"])
    assert bad.exit_code == 1 and "1 <= min <= max" in bad.output and "Traceback" not in bad.output


def test_cli_bench_and_chat_with_prompt_lookup(tiny_folder, tmp_path):
    from billion.cli import cli

    out = tmp_path / "results"
    r = CliRunner().invoke(cli, ["bench", "-m", "tiny:tinyllama", "-b", "torch", "--draft", "ngram:2", "-p", "8",
                                 "-n", "8", "-r", "1", "--warmup", "0", "--results-dir", str(out)])
    assert r.exit_code == 0, r.output
    (record,) = [json.loads(f.read_text()) for f in out.glob("bench-*.json")]
    assert record["config"]["draft"] == "ngram:2"
    args = ["chat", "-m", "tiny:tinyllama", "-b", "all", "--device", "cpu", "--dtype", "float32", "-p", REPEATING,
            "-n", "24", "--json", "--results-dir", str(out)]
    plain, drafted = ([json.loads(line) for line in CliRunner().invoke(cli, a).stdout.splitlines()]
                      for a in (args, args + ["--draft", "ngram", "--num-draft", "3"]))
    assert [d["backend"] for d in drafted] == ENGINES
    for p, d in zip(plain, drafted, strict=True):
        assert d["reply_token_ids"] == p["reply_token_ids"] and d["config"]["draft"] == "ngram:3"
        assert d["metrics"]["tokens_from_draft"] > 0 and p["metrics"]["tokens_from_draft"] == 0


def test_best_k_is_chosen_among_lossless_k_only():
    from billion.tasks.speculate import best_k

    per_k = {1: {"speedup": 1.2, "greedy_same_as_target": True},
             2: {"speedup": 1.9, "greedy_same_as_target": False},  # faster, but not the target's output
             4: {"speedup": 1.5, "greedy_same_as_target": True}}
    assert best_k(per_k) == 4
    assert best_k({2: per_k[2]}) is None
    assert best_k({1: {"speedup": 1.1, "greedy_same_as_target": None}}) == 1  # sampling: no greedy check
