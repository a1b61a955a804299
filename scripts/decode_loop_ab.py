"""Before and after a change to the decode path: `billion bench` from two commits, alternately.

Checks out --before (default: the commit before the one scheduler, when each engine still had its
own `_token_stream`) as a git worktree under ~/.cache/billion/worktrees, then runs `billion bench`
(the same model, engine, prompt and token counts) from that tree and from this one, one after the
other, --rounds times, each run in its own process. Reports the median decode tok/s and TTFT of
each side and the ratio after / before per engine. Nothing else should run on the machine.

    .venv/bin/python scripts/decode_loop_ab.py -m gguf:smollm2-135m -b torch,mlx -n 128 --rounds 5
    .venv/bin/python scripts/decode_loop_ab.py -b torch --batch 8 --before 7a9d6a1   # a batch of 8 (aggregate)

Writes one `decode_loop_ab` record per engine under --results-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from billion.records.store import make_record, write_record

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "39631e0"  # the last commit with the four loops (Backend._token_stream, session_tokens, ...)


def worktree(rev: str) -> Path:
    home = Path(os.environ.get("BILLION_HOME", Path.home() / ".cache" / "billion"))
    path = home / "worktrees" / rev
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
    return path


def bench_once(tree: Path, args, engine: str) -> dict:
    """One `billion bench` process run from `tree`: its record's metrics (with --batch, the batch's
    aggregate decode tok/s as decode_tps)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "billion", "bench", "-m", args.model, "-b", engine,
               "-p", str(args.prompt_tokens), "-n", str(args.gen_tokens), "-r", str(args.runs),
               "--results-dir", out] + (["--batch", str(args.batch)] if args.batch > 1 else ["--no-parity"])
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench failed in {tree}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        (record,) = [json.loads(p.read_text()) for p in Path(out).glob("bench*.json")]
        metrics = record["metrics"]
        return {**metrics, "decode_tps": metrics["aggregate_decode_tps"]} if args.batch > 1 else metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="gguf:smollm2-135m")
    parser.add_argument("-b", "--backends", default="torch,mlx")
    parser.add_argument("-p", "--prompt-tokens", type=int, default=128)
    parser.add_argument("-n", "--gen-tokens", type=int, default=128)
    parser.add_argument("-r", "--runs", type=int, default=3, help="timed runs inside each bench process")
    parser.add_argument("--rounds", type=int, default=5, help="bench processes per side, alternating")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (bench --batch)")
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--results-dir", default="results")
    args = parser.parse_args()
    trees = {"before": worktree(args.before), "after": ROOT}
    for engine in args.backends.split(","):
        started = time.time()
        got = {side: [] for side in trees}
        for i in range(args.rounds):
            for side, tree in trees.items():
                metrics = bench_once(tree, args, engine)
                got[side].append(metrics)
                print(f"{engine} round {i + 1} {side}: decode {metrics['decode_tps']:.1f} tok/s, "
                      f"ttft {metrics['ttft_s'] * 1e3:.1f} ms", flush=True)
        med = {side: {k: statistics.median(m[k] for m in runs) for k in ("decode_tps", "ttft_s")}
               for side, runs in got.items()}
        ratio = med["after"]["decode_tps"] / med["before"]["decode_tps"]
        print(f"{engine}: decode {med['after']['decode_tps']:.1f} vs {med['before']['decode_tps']:.1f} tok/s "
              f"(after / before {ratio:.3f}); ttft {med['after']['ttft_s'] * 1e3:.1f} vs "
              f"{med['before']['ttft_s'] * 1e3:.1f} ms")
        record = make_record("decode_loop_ab", engine, args.model,
                             config={"before": args.before, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
                                     "gen_tokens": args.gen_tokens, "runs": args.runs, "rounds": args.rounds},
                             metrics={"decode_tps_after": med["after"]["decode_tps"],
                                      "decode_tps_before": med["before"]["decode_tps"],
                                      "decode_ratio": ratio, "ttft_s_after": med["after"]["ttft_s"],
                                      "ttft_s_before": med["before"]["ttft_s"],
                                      "runs": {side: [m["decode_tps"] for m in runs] for side, runs in got.items()}},
                             started=started)
        print("wrote", write_record(record, args.results_dir))


if __name__ == "__main__":
    main()
