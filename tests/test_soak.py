"""scripts/soak.py for 20 seconds against a real `billion serve -b all` (tiny model): every request
kind but tool calls (the tiny model's 512-token context cannot hold the tools prompt; the 30-minute
soak on the real model runs them), no 5xx, no wrong answer, memory and per-engine state bounded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_20_second_soak_of_both_engines(tiny_folder, tmp_path):
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "-m", str(tiny_folder("tinyllama")),
                          "--minutes", "0.33", "--warmup-minutes", "0.15", "--window-minutes", "0.08", "--sample-s", "1",
                          "--clients", "4", "--skip", "tool", "--results-dir", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = out.glob("soak-*.json")
    metrics = json.loads(path.read_text())["metrics"]
    assert metrics["status_5xx"] == metrics["wrong"] == metrics["client_errors"] == 0
    kinds = {key.split()[0] for key in metrics["by_kind_status"]}
    assert kinds == {"chat", "stream", "logprobs", "chat_logprobs", "schema", "conversation", "unique", "cancelled",
                     "abandoned", "malformed"}, kinds
    assert metrics["requests"] > 60  # a real load, not a handful
    assert path.with_suffix(".png").stat().st_size > 0
