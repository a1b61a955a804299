"""One record schema for every task and both engines, written atomically as JSON.

A record: task, backend, model spec, config, metrics (units in the names:
`decode_tps`, `ttft_s`, `peak_memory_gb`), environment, start time, duration,
status ("complete" or "interrupted"). Reports and comparisons are rendered from
records only.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import tempfile
import time
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from backends import host

SCHEMA_VERSION = 1
REQUIRED = {"schema": int, "task": str, "backend": str, "model": str, "config": dict, "metrics": dict,
            "environment": dict, "started_at": str, "duration_s": float, "status": str}
PACKAGES = ("billion", "mlx", "mlx-lm", "torch", "transformers", "peft", "trl", "datasets", "numpy")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    env = {
        "chip": host.chip_name(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_count": os.cpu_count(),
        "memory_gb": round(host.total_memory_bytes() / 1e9, 1),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": git_commit(),
    }
    if os.environ.get("OMP_NUM_THREADS"):  # thread count changes CPU timings a lot
        env["omp_num_threads"] = os.environ["OMP_NUM_THREADS"]
    if hasattr(os, "getloadavg"):  # noisy shared machines: keep the load next to the numbers
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return env


def make_record(task: str, backend: str, model: str, config: dict, metrics: dict, *,
                started: float, status: str = "complete", extra: dict | None = None,
                source: dict | None = None) -> dict:
    """A record of `model` (its spec as typed); `source` is where its weights came from
    (ResolvedModel.source: a GGUF file and its quantization type, seeded random weights, or None)."""
    record = {
        "schema": SCHEMA_VERSION, "task": task, "backend": backend, "model": str(model),
        "model_source": source,
        "config": config, "metrics": metrics, "environment": environment(),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 3), "status": status,
    }
    if extra:
        record.update(extra)
    validate(record)
    return record


def validate(record: dict) -> None:
    for key, kind in REQUIRED.items():
        if key not in record:
            raise ValueError(f"record lacks {key!r}")
        if not isinstance(record[key], kind):
            raise ValueError(f"record field {key!r} should be {kind.__name__}")
    if record["status"] not in ("complete", "interrupted"):
        raise ValueError(f"bad status {record['status']!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()[:60]


def write_record(record: dict, results_dir: str | Path) -> Path:
    """Write atomically (temp file + rename) as results_dir/<task>-<model>-<backend>-<time>.json."""
    out_dir = Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = out_dir / f"{record['task']}-{_slug(record['model'])}-{_slug(record['backend'])}-{stamp}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class RecordWarning(UserWarning):
    """A file among the records that is not one (damaged, or not a JSON object): skipped."""


def read_records(paths) -> list[dict]:
    """The records in `paths` (folders of *.json, or files). A file that cannot be read, is not
    JSON or not a JSON object is skipped with a `RecordWarning` naming it; a JSON object that is
    not a valid record is skipped quietly (as before)."""
    records = []
    for p in paths:
        p = Path(p)
        for f in sorted(p.glob("*.json")) if p.is_dir() else [p]:
            try:
                rec = json.loads(f.read_bytes())
            except OSError as e:
                warnings.warn(f"{f}: skipped, cannot read it ({e.strerror})", RecordWarning, stacklevel=2)
                continue
            except (ValueError, RecursionError) as e:  # invalid JSON, not UTF-8
                why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 JSON"
                warnings.warn(f"{f}: skipped, not a JSON record ({why})", RecordWarning, stacklevel=2)
                continue
            if not isinstance(rec, dict):
                kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(rec), "number")
                warnings.warn(f"{f}: skipped, a JSON {kind} is not a record (a JSON object)",
                              RecordWarning, stacklevel=2)
                continue
            try:
                validate(rec)
            except ValueError:
                continue
            rec["_file"] = str(f)
            records.append(rec)
    return records
