"""billion (torch) against llama.cpp at the scale billion is for: a 1.1B-class model with random
weights, float32 and bfloat16, batch 1 and batch 8, both on the same weights.

Speed does not depend on weight values, but llama.cpp's converter takes only tokenizers it knows
(by their hash), and `random:` folders carry a home-made one. So the folder here has the real
architecture of --alias (TinyLlama-1.1B's: 22 layers, hidden 2048, GQA 32/4) with seeded random
weights and a real tokenizer, SmolLM2's from the packaged GGUF (49,152 tokens instead of
TinyLlama's 32,000, so the embeddings and head hold 1.17B parameters in all, not 1.10B). The GGUF
files are llama.cpp's own conversion of that folder (F32, BF16).

Each pair is run one after the other, the same work: a --prompt-token prompt, --gen-tokens
generated, medians of --runs. Batch 1: `billion bench` against `llama-bench`; batch 8: `billion
bench --batch 8` against `llama-batched-bench` (S_TG, aggregate decode tok/s).

    bash scripts/setup_llamacpp.sh --tools    # the converter and llama-bench, llama-batched-bench
    .venv/bin/python scripts/target_scale_vs_llamacpp.py --dtypes float32,bfloat16 --batch 1,8
    .venv/bin/python scripts/target_scale_vs_llamacpp.py -m gguf:smollm2-135m --dtypes float32  # the real 135M

Prints a table and writes one `target_scale` record under --results-dir (billion's own `bench`
and `bench_batch` records are written beside it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_batched_bench import VERSION, sweep  # noqa: E402  scripts/llama_batched_bench.py, beside this file

from backends import host  # noqa: E402
from backends.folders import billion_home  # noqa: E402
from backends.folders.synthetic import build_folder, count_parameters  # noqa: E402
from backends.llamacpp_engine.convert import gguf_file  # noqa: E402
from billion.loading import resolve  # noqa: E402
from billion.models import card_for  # noqa: E402
from billion.records.store import make_record, write_record  # noqa: E402


def folder(alias: str, tokenizer_from: str) -> Path:
    from transformers import AutoTokenizer

    card = card_for(alias)
    real = resolve(tokenizer_from, progress=False).folder
    out = billion_home() / "models" / f"random-{alias}-tokenizer-of-{Path(real).name}"
    return build_folder(out, card.config, card.family, tiny=False, tokenizer=AutoTokenizer.from_pretrained(real))


def billion_bench(path: Path, dtype: str, batch: int, p: int, n: int, runs: int, results: str) -> float:
    """billion bench's decode tok/s (aggregate at batch > 1), from the record it writes to `results`."""
    before = set(Path(results).glob("*.json"))
    cmd = [sys.executable, "-m", "billion", "bench", "-m", str(path), "-b", "torch", "--dtype", dtype,
           "-p", str(p), "-n", str(n), "-r", str(runs), "--results-dir", results]
    if batch > 1:
        cmd += ["--batch", str(batch)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (new,) = set(Path(results).glob("*.json")) - before
    metrics = json.loads(new.read_text())["metrics"]
    return metrics["aggregate_decode_tps"] if batch > 1 else metrics["decode_tps"]


def llama_bench(binary: Path, gguf: Path, n: int, runs: int) -> float:
    """llama-bench's text-generation tok/s (its -n test: n tokens decoded one at a time)."""
    cmd = [str(binary), "-m", str(gguf), "-p", "0", "-n", str(n), "-r", str(runs), "-t", str(host.usable_cores()),
           "-o", "json"]
    (row,) = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return float(row["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alias", default="tinyllama")
    ap.add_argument("-m", "--model", default=None,
                    help="Time this model spec's own folder instead (e.g. the real gguf:smollm2-135m).")
    ap.add_argument("--tokenizer-from", default="gguf:smollm2-135m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=64)
    ap.add_argument("-n", "--gen-tokens", type=int, default=32)
    ap.add_argument("-r", "--runs", type=int, default=3)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    started = time.time()
    bin_dir = billion_home() / f"llama.cpp-{VERSION}" / "bin"
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    path = resolve(args.model, progress=False).folder if args.model else folder(args.alias, args.tokenizer_from)
    config = json.loads((path / "config.json").read_text())
    rows = []
    for dtype in args.dtypes.split(","):
        gguf = gguf_file(path, VERSION, dtype, None)
        for batch in map(int, args.batch.split(",")):
            ours = billion_bench(path, dtype, batch, args.prompt_tokens, args.gen_tokens, args.runs,
                                 args.results_dir)
            if batch == 1:
                theirs = llama_bench(bin_dir / "llama-bench", gguf, args.gen_tokens, args.runs)
            else:
                runs = [sweep(bin_dir / "llama-batched-bench", gguf, [batch], args.prompt_tokens,
                              args.gen_tokens)[batch][1] for _ in range(args.runs)]
                theirs = statistics.median(runs)
            rows.append({"dtype": dtype, "batch": batch, "billion_tps": ours, "llama_cpp_tps": theirs,
                         "ratio": ours / theirs})
            print(f"{dtype:9} batch {batch}: billion {ours:7.2f} tok/s, llama.cpp {theirs:7.2f} tok/s, "
                  f"ratio {ours / theirs:.2f}", flush=True)
    record = make_record("target_scale", "torch", str(path), {
        "model": args.model, "alias": None if args.model else args.alias,
        "tokenizer_from": None if args.model else args.tokenizer_from, "parameters": count_parameters(config),
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "runs": args.runs,
        "llama_cpp": VERSION}, {"rows": rows}, started=started)
    print(f"record: {write_record(record, args.results_dir)}")


if __name__ == "__main__":
    main()
