"""Which kernel and weight layout the torch engine's CPU linear layers should run
(backends/torch_engine/cpu_linear.py): decode tok/s per choice, at batch 1 and at batch B.

Loads one model on the torch engine (CPU) and times greedy decode with its linear layers on torch's
own kernel (`F.linear`: MKL in float32 on x86), on oneDNN with the weights as stored, and on oneDNN
with the weights packed for cpu_linear.PACK_ROWS rows, switching between them in one process round
by round, so that the machine's drift falls on all three. Batch 1 runs through Backend.stream
(decode time: first token to last); batch B through generate_all (a prefill-only run of the same
prompts subtracted). Medians of --rounds. What the engine picks is `cpu_linear.packs`.

    .venv/bin/python scripts/cpu_linear_layouts.py -m gguf:smollm2-135m --batch 8 -n 64
    .venv/bin/python scripts/cpu_linear_layouts.py -m PATH --dtype bfloat16 -n 16   # e.g. target_scale's folder

Prints the table and writes one `cpu_linear_layouts` record under --results-dir.
"""

from __future__ import annotations

import argparse
import statistics
import time

from backends.batching import generate_all
from backends.torch_engine import cpu_linear
from backends.types import GenerationConfig
from billion.loading import LoadOptions, load, resolve
from billion.records.store import make_record, write_record

LAYOUTS = ("torch F.linear", "oneDNN, as stored", f"oneDNN, packed for {cpu_linear.PACK_ROWS} rows")


def set_layout(model, layout: str) -> None:
    cpu_linear.unroute(model)
    if layout != LAYOUTS[0]:
        cpu_linear.route(model, pack=layout == LAYOUTS[2])


def decode_tps(backend, prompt: list[int], gen: GenerationConfig, batch: int) -> float:
    if batch == 1:
        start, count = None, 0
        for _ in backend.stream(prompt, gen):
            start = start or time.perf_counter()
            count += 1
        return (count - 1) / (time.perf_counter() - start)
    first = GenerationConfig(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    generate_all(backend, [prompt] * batch, [first] * batch, max_batch=batch)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    generate_all(backend, [prompt] * batch, [gen] * batch, max_batch=batch)
    return batch * (gen.max_tokens - 1) / (time.perf_counter() - start - prefill)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=32)
    ap.add_argument("-n", "--gen-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    if not cpu_linear.available():
        raise SystemExit("oneDNN routing is for x86 CPUs with oneDNN; this machine keeps torch's F.linear")
    started = time.time()
    model = resolve(args.model)
    backend = load("torch", model, LoadOptions(device="cpu", dtype=args.dtype))
    backend._route = lambda pack: None  # this script sets the layout itself; the engine's rule stays out
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    gen = GenerationConfig(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for batch in map(int, args.batch.split(",")):
        got = {layout: [] for layout in LAYOUTS}
        for _ in range(args.rounds):
            for layout in LAYOUTS:
                set_layout(backend.model, layout)
                decode_tps(backend, prompt, gen, batch)  # warm-up: oneDNN builds its kernels for these shapes
                got[layout].append(decode_tps(backend, prompt, gen, batch))
        base = statistics.median(got[LAYOUTS[0]])
        for layout, runs in got.items():
            rows.append({"batch": batch, "layout": layout, "decode_tps": statistics.median(runs), "runs": runs,
                         "vs_torch": statistics.median(runs) / base})
            print(f"batch {batch:2d}  {layout:30s} {statistics.median(runs):8.2f} tok/s  "
                  f"{statistics.median(runs) / base:5.2f}x  runs {', '.join(f'{r:.2f}' for r in runs)}", flush=True)
    backend.close()
    record = make_record("cpu_linear_layouts", "torch", str(model), vars(args),
                         {"rows": rows, "pack_rows": cpu_linear.PACK_ROWS}, started=started, source=model.source)
    print(f"record: {write_record(record, args.results_dir)}")


if __name__ == "__main__":
    main()
