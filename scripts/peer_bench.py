"""billion's torch engine against llama.cpp (the peer), precision by precision, interleaved in one run.

For each pair -- torch float32 / llama.cpp F32, torch bfloat16 / llama.cpp F16, torch int8 /
llama.cpp Q8_0, torch int4 / llama.cpp Q4_0 (llama.cpp's files converted from the same folder by
its own convert_hf_to_gguf.py and quantizer, see backends/llamacpp_engine/convert.py) -- both
engines are loaded at once and timed exactly as `billion bench` times an engine (billion.tasks.bench:
the same seeded random prompt, EOS ignored, greedy, one warm-up), alternating run by run so that
whatever the machine does meanwhile falls on both. Medians of --runs. With --mlx, MLX float32
joins the float32 pair (slow on MLX's CPU build). With --compile, torch with `--compile` (a
torch.compile'd decode step on a static KV cache) joins every pair beside eager torch; its compile
time is in its record's model_info and the table says whether its tokens are eager's. Then the float32 logits of all engines
teacher-forced on the same tokens (top-1 agreement, KL): the same model on three engines.

    bash scripts/setup_llamacpp.sh     # once: llama-cpp-python from source (~10 min) + the converter
    .venv/bin/python scripts/peer_bench.py -m gguf:smollm2-135m --runs 3
    .venv/bin/python scripts/peer_bench.py -m random:tinyllama --pairs float32,bfloat16

Writes a `bench` record per engine and precision (config.interleaved_with names the partner), a
`parity` record per engine pair and one `peer_bench` record holding the table and its ratios.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import NamedTuple

from backends.llamacpp_engine import convert
from backends.types import GenerationConfig
from billion.tasks import bench
from billion.tasks.compare import parity
from billion.loading import LoadOptions, ResolvedModel, load, resolve
from billion.records.store import make_record, write_record

class Member(NamedTuple):
    engine: str
    dtype: str
    quantize: str | None = None
    compile: bool = False


# name -> (billion's torch, the peer)
PAIRS = {
    "float32": (Member("torch", "float32"), Member("llama.cpp", "float32")),
    "bfloat16": (Member("torch", "bfloat16"), Member("llama.cpp", "float16")),
    "int8": (Member("torch", "float32", "int8"), Member("llama.cpp", "float32", "int8")),
    "int4": (Member("torch", "float32", "int4"), Member("llama.cpp", "float32", "int4")),
}


def label(m: Member) -> str:
    if m.engine == "llama.cpp":  # the GGUF type the peer's conversion makes (backends/llamacpp_engine/convert.py)
        kind = convert.QUANT_TYPES[m.quantize][0] if m.quantize else convert.FLOAT_TYPES[m.dtype].upper()
        return f"llama.cpp {kind}"
    return f"{m.engine} {m.quantize or m.dtype}" + (" compiled" if m.compile else "")


def interleaved(model: ResolvedModel, members, cfg: bench.BenchConfig, group: int) -> dict:
    """Load `members`, warm each up, then time cfg.runs runs of each, alternating."""
    loaded = {}
    try:
        for m in members:
            t = time.perf_counter()
            options = LoadOptions(dtype=m.dtype, quantize=m.quantize, group_size=group, compile=m.compile)
            loaded[m] = load(m.engine, model, options)
            print(f"  loaded {label(m)} in {time.perf_counter() - t:.1f} s: {loaded[m].info().quantization or m.dtype}")
        b0 = next(iter(loaded.values()))
        prompt = bench.random_prompt(b0.vocab_size, cfg.prompt_tokens, cfg.seed)
        gen = GenerationConfig(max_tokens=cfg.gen_tokens, temperature=0.0, ignore_eos=True)
        results = {m: bench.BenchResult(cfg) for m in members}
        for m, b in loaded.items():
            t = time.perf_counter()
            bench.time_generation(b, prompt, bench.warmup_config(b, cfg.gen_tokens))
            print(f"  warm-up {label(m)}: {time.perf_counter() - t:.1f} s")
            b.reset_peak_memory()
        for i in range(cfg.runs):
            for m, b in loaded.items():
                run = bench.time_generation(b, prompt, gen)
                results[m].runs.append(run)
                print(f"  run {i + 1}/{cfg.runs} {label(m):24s} prefill {run.prefill_tps:7.1f} tok/s, "
                      f"decode {run.decode_tps:6.2f} tok/s")
        out = {}
        for m, b in loaded.items():
            metrics = bench.summarise(b, results[m])
            out[m] = {"metrics": metrics, "info": b.info().__dict__, "runs": results[m].runs,
                      # float32 logits for parity; a compiled member's are its eager twin's (same forward)
                      "logits": b.logits(prompt + results[m].runs[0].tokens)
                      if (m.quantize, m.dtype, m.compile) == (None, "float32", False) else None, "tokens": results[m].runs[0].tokens, "prompt": prompt}
        return out
    finally:
        for b in loaded.values():
            b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"Comma list of {', '.join(PAIRS)}.")
    ap.add_argument("--mlx", action="store_true", help="Add MLX float32 to the float32 pair.")
    ap.add_argument("--compile", action="store_true", help="Add torch --compile to every pair.")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64, help="torch int4 group size (llama.cpp's are 32).")
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()

    model = resolve(args.model)
    cfg = bench.BenchConfig(prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, runs=args.runs)
    started = time.time()
    rows, float32 = [], {}
    for name in args.pairs.split(","):
        members = list(PAIRS[name])
        if args.compile:
            members.append(members[0]._replace(compile=True))
        if name == "float32" and args.mlx:
            members.append(Member("mlx", "float32"))
        print(f"{name}: " + " / ".join(label(m) for m in members))
        done = interleaved(model, members, cfg, args.group_size)
        peer = done[members[1]]["metrics"]
        for m, d in done.items():
            partners = [label(o) for o in members if o != m]
            config = {**asdict(cfg), "dtype": m.dtype, "quantize": m.quantize, "compile": m.compile,
                      "group_size": args.group_size, "interleaved_with": partners}
            rec = make_record("bench", m.engine, str(model), config, d["metrics"], started=started, source=model.source,
                              extra={"model_info": d["info"], "runs": [r.__dict__ for r in d["runs"]]})
            write_record(rec, args.results_dir)
            if d["logits"] is not None:
                float32[m.engine] = (d["logits"], d["tokens"])
            eager = done[m._replace(compile=False)]
            rows.append({"pair": name, "engine": label(m), "prefill_tps": d["metrics"].get("prefill_tps"),
                         "decode_tps": d["metrics"].get("decode_tps"), "weight_gb": d["metrics"]["weight_gb"],
                         "bandwidth_fraction": d["metrics"].get("bandwidth_fraction"),
                         "decode_vs_peer": d["metrics"]["decode_tps"] / peer["decode_tps"],
                         "prefill_vs_peer": d["metrics"]["prefill_tps"] / peer["prefill_tps"],
                         "decode_vs_torch_float32": None, "compiled": d["info"].get("compiled"),
                         "same_tokens_as_eager": d["tokens"] == eager["tokens"] if m.compile else None})
    base = next((r["decode_tps"] for r in rows if r["engine"] == "torch float32"), None)
    for r in rows:
        r["decode_vs_torch_float32"] = r["decode_tps"] / base if base else None

    agreement = {}
    names = list(float32)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (la, ta), (lb, tb) = float32[a], float32[b]
            p = parity(la, lb, ta, tb)
            agreement[f"{a} vs {b}"] = p
            write_record(make_record("parity", f"{a},{b}", str(model), {**asdict(cfg), "dtype": "float32"}, p,
                                     started=started, source=model.source), args.results_dir)

    print(f"\n{'engine':24s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'decode vs peer':>15s} "
          f"{'prefill vs peer':>16s} {'weights GB':>11s}")
    for r in rows:
        print(f"{r['engine']:24s} {r['prefill_tps']:14.1f} {r['decode_tps']:13.2f} {r['decode_vs_peer']:14.2f}x "
              f"{r['prefill_vs_peer']:15.2f}x {r['weight_gb']:11.3f}")
    for k, p in agreement.items():
        print(f"float32 logits {k}: top-1 {p['top1_agreement']:.1%}, max |dlogit| {p['max_abs_logit_diff']:.2e}, "
              f"mean KL {p['mean_kl']:.2e}, first greedy divergence {p['first_greedy_divergence']}")
    metrics = {"rows": rows, "float32_agreement": agreement,
               "median_of_runs": args.runs, "note": "ratios: each row over its pair's llama.cpp row"}
    for r in rows:
        if r["compiled"]:
            print(f"{r['engine']}: {r['compiled']}; same tokens as eager: {r['same_tokens_as_eager']}")
    rec = make_record("peer_bench", "torch,llama.cpp" + (",mlx" if args.mlx else ""), str(model),
                      {**asdict(cfg), "pairs": args.pairs, "group_size": args.group_size,
                       "compile": args.compile}, metrics,
                      started=started, source=model.source)
    print(f"record: {write_record(rec, args.results_dir)}")


if __name__ == "__main__":
    main()
