"""llama.cpp's own batched decoding beside `billion bench --batch`: llama-batched-bench on the same
weights, its figures written as `bench_batch` records (backend llama.cpp) so the report draws
them on the same chart.

For each batch size B llama-batched-bench prefills B prompts of -p tokens and generates -n tokens
for each, decoding the B sequences together; S_PP (B * p / prefill time) is its prefill tok/s and
S_TG (B * n / generation time) its aggregate decode tok/s, as bench --batch's. Medians over --runs
runs of the whole sweep. The GGUF is llama.cpp's own conversion of the folder billion loads
(backends/llamacpp_engine/convert.py; F32 for float32), so both read the same weights.

    bash scripts/setup_llamacpp.sh --tools        # builds llama-batched-bench
    .venv/bin/python scripts/llama_batched_bench.py -m gguf:smollm2-135m --batch 1,2,4,8,16 -p 128 -n 64
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

from backends import host
from backends.folders import billion_home
from backends.llamacpp_engine.convert import gguf_file
from billion.loading import resolve
from billion.records.store import make_record, write_record

VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|"
                 r"\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|")


def sweep(binary: Path, gguf: Path, sizes: list[int], p: int, n: int) -> dict[int, tuple[float, float]]:
    """{B: (S_PP prefill tok/s, S_TG aggregate decode tok/s)} from one llama-batched-bench run."""
    cmd = [str(binary), "-m", str(gguf), "-c", str(max(sizes) * (p + n) + 64), "-b", "2048", "-ub", "512",
           "-npp", str(p), "-ntg", str(n), "-npl", ",".join(map(str, sizes)), "-t", str(host.usable_cores())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line.strip())
        if m:
            batch = int(m.group(3))
            rows[batch] = (float(m.group(6)), float(m.group(8)))
    if set(rows) != set(sizes):
        raise SystemExit(f"llama-batched-bench printed rows for {sorted(rows)}, not {sizes}:\n{out[-2000:]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("--batch", default="1,2,4,8,16")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bin", default=str(billion_home() / f"llama.cpp-{VERSION}" / "bin" / "llama-batched-bench"))
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch.split(",")]
    model = resolve(args.model, progress=False)
    gguf = gguf_file(model.folder, VERSION, "float32", None)
    started = time.time()
    runs = [sweep(Path(args.bin), gguf, sizes, args.prompt_tokens, args.gen_tokens) for _ in range(args.runs)]
    base = None
    for b in sizes:
        prefill = statistics.median(r[b][0] for r in runs)
        decode = [r[b][1] for r in runs]
        metrics = {"batch_size": b, "runs_completed": len(runs), "prefill_tps": prefill,
                   "aggregate_decode_tps": statistics.median(decode), "aggregate_decode_tps_min": min(decode),
                   "aggregate_decode_tps_max": max(decode),
                   "per_sequence_decode_tps": statistics.median(decode) / b}
        base = base or metrics["aggregate_decode_tps"]
        config = {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "runs": args.runs,
                  "batch_size": b, "dtype": "float32", "quantize": None, "tool": "llama-batched-bench",
                  "gguf": gguf.name}
        record = make_record("bench_batch", "llama.cpp", str(model), config, metrics, started=started,
                             source=model.source, extra={"model_info": {"quantization": "llama.cpp F32"}})
        path = write_record(record, args.results_dir)
        print(f"llama.cpp F32 batch {b}: prefill {prefill:.0f} tok/s, aggregate decode "
              f"{metrics['aggregate_decode_tps']:.1f} tok/s ({metrics['aggregate_decode_tps'] / base:.2f}x), "
              f"per sequence {metrics['per_sequence_decode_tps']:.1f}; record: {path}")


if __name__ == "__main__":
    main()
