"""Why torch decodes slowly on a CPU: one token's matrix products, kernel by kernel, beside llama.cpp's.

Decode multiplies one row (a batch: a few rows) by every weight matrix, so its speed is the bytes
per second the kernel reads. This times, on weights too large for any cache (--layers copies of an
--out x --in matrix, read in turn), at each of --rows rows: the kernels torch can use for a float32
layer -- F.linear (MKL on x86 builds), oneDNN's linear on the weight as stored (what billion's torch
engine runs on x86 CPUs: backends/torch_engine/cpu_linear.py), oneDNN on a pre-packed weight (what
torch.compile's CPU freezing uses) --, bfloat16 weights (F.linear, and oneDNN pre-packed), dynamic
int8 (fbgemm) and torchao's int8 weight-only, and numpy's BLAS on the same data, at 1 and at all
threads. Medians of --repeats passes.

With --llama-cpp, llama.cpp's own matmul kernels (ggml's CPU backend, through its
test-backend-ops tool: `bash scripts/setup_llamacpp.sh --tools`) are timed on the same shape at
the same row counts, F32 and BF16. test-backend-ops times one shape only, Llama-3-8B's down
projection (m=4096, k=14336), so --llama-cpp takes --out 4096 --in 14336; and it gives its CPU
backend half the machine's cores, one thread here, so its figures sit in the 1-thread column.

    .venv/bin/python scripts/cpu_matmul_probe.py                 # SmolLM2-135M's MLP shape
    .venv/bin/python scripts/cpu_matmul_probe.py --out 5632 --in 2048 --layers 8   # TinyLlama's
    .venv/bin/python scripts/cpu_matmul_probe.py --llama-cpp --out 4096 --in 14336 --layers 2

    .venv/bin/python scripts/cpu_matmul_probe.py --profile-model gguf:smollm2-135m   # where decode goes

Prints GB/s (weight bytes read per second) per kernel and row count, and what one call costs with
(almost) nothing to read, for torch's `F.linear` and oneDNN; writes one `cpu_matmul_probe`
record under --results-dir (the chip named in its machine, as in every record). With --profile-model, also torch's
profiler over 16 decode steps of that model (billion's torch engine, float32): the share of the
time each operator takes, in the record too.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from backends import host
from backends.folders import billion_home
from billion.records.store import make_record, write_record

if TYPE_CHECKING:
    from billion.loading import ResolvedModel

VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
GGML_SHAPE = (4096, 14336)  # the one mul_mat shape test-backend-ops' perf mode times (m, k)


def timed(mats, call, repeats: int) -> float:
    """Median seconds for one pass over all matrices."""
    with torch.inference_mode():
        for w in mats:
            call(w)
        passes = []
        for _ in range(repeats):
            start = time.perf_counter()
            for w in mats:
                call(w)
            passes.append(time.perf_counter() - start)
    return statistics.median(passes)


def onednn(x):
    return lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def kernels(weights: list[torch.Tensor], rows: int):
    """(name, bytes read per pass, prepared weights, call) for each kernel, on `rows` input rows."""
    x = torch.randn(rows, weights[0].shape[1])
    f32 = sum(w.numel() * 4 for w in weights)
    yield "torch F.linear float32 (MKL)", f32, weights, lambda w: nn.functional.linear(x, w)
    yield "torch oneDNN float32 (billion's)", f32, weights, onednn(x)
    yield "torch oneDNN float32 pre-packed", f32, [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights], \
        onednn(x)
    xb = x.bfloat16()
    yield "torch F.linear bfloat16", f32 // 2, [w.bfloat16() for w in weights], lambda w: nn.functional.linear(xb, w)
    yield "torch oneDNN bfloat16 pre-packed", f32 // 2, \
        [torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows) for w in weights], onednn(xb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's quantized tensors are deprecated (moving to torchao)
        import torch.ao.quantization as tq

        dyn = [tq.quantize_dynamic(nn.Sequential(_linear(w)), {nn.Linear}, dtype=torch.qint8) for w in weights]
    yield "torch dynamic int8 (fbgemm)", f32 // 4, dyn, lambda m: m(x)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        ao = [nn.Sequential(_linear(w)) for w in weights]
        for m in ao:
            quantize_(m, Int8WeightOnlyConfig())
        yield "torchao int8 weight-only", f32 // 4, ao, lambda m: m(x)
    except ImportError:
        pass
    xn = x.numpy()
    yield "numpy float32 (its BLAS)", f32, [w.numpy() for w in weights], lambda w: xn @ w.T


def call_overhead_us(calls: int = 20000) -> dict:
    """Microseconds one call costs where there is almost nothing to read (a 64 x 64 weight, one row):
    what a model of many small matrices pays per layer before any weight is read."""
    x, w = torch.randn(1, 64), torch.randn(64, 64)
    out = {}
    for name, call in (("torch F.linear", lambda: nn.functional.linear(x, w)), ("torch oneDNN", lambda: onednn(x)(w))):
        with torch.inference_mode():
            for _ in range(calls // 10):
                call()
            start = time.perf_counter()
            for _ in range(calls):
                call()
        out[name] = (time.perf_counter() - start) / calls * 1e6
    return out


def llama_cpp_rows(binary: Path, rows_list: list[int]) -> list[dict]:
    """ggml's CPU mul_mat on GGML_SHAPE, F32 and BF16 weights, float32 rows: GB/s of weight read
    (test-backend-ops runs the CPU backend on half the cores: on 2 cores, one thread)."""
    m, k = GGML_SHAPE
    found = []
    for kind, size in (("f32", 4), ("bf16", 2)):
        pattern = f"type_a={kind},type_b=f32,m={m},n=({'|'.join(map(str, rows_list))}),k={k},"
        out = subprocess.run([str(binary), "perf", "-o", "MUL_MAT", "-b", "CPU", "-p", pattern],
                             capture_output=True, text=True, check=True).stdout
        for n, us in re.findall(r"type_a=\w+,type_b=f32,m=\d+,n=(\d+),k=\d+.*?([\d.]+) us/run", out):
            found.append({"kernel": f"llama.cpp ggml {kind.upper()}", "rows": int(n), "bytes_per_pass": m * k * size,
                          "gbs_1_threads": m * k * size / (float(us) / 1e6) / 1e9})
    if not found:
        raise SystemExit(f"{binary} timed no MUL_MAT case matching m={m}, k={k}")
    return found


def _linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight = nn.Parameter(w.clone(), requires_grad=False)
    return layer


def profile_decode(model: "ResolvedModel", steps: int = 16) -> list[dict]:
    """Self CPU time per operator over `steps` greedy decode steps after a 128-token prompt."""
    from torch.profiler import ProfilerActivity, profile

    from backends.types import GenerationConfig
    from billion.loading import LoadOptions, load

    backend = load("torch", model, LoadOptions(dtype="float32"))
    try:
        prompt = list(range(1000, 1128))
        gen = GenerationConfig(max_tokens=steps, temperature=0.0, ignore_eos=True)
        backend.generate(prompt, gen)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            backend.generate(prompt, gen)
    finally:
        backend.close()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count,
             "avg_us": e.self_cpu_time_total / e.count} for e in events[:8]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=1536)
    ap.add_argument("--in", dest="inp", type=int, default=576)
    ap.add_argument("--layers", type=int, default=40, help="Matrices read in turn (their total defeats caches).")
    ap.add_argument("--rows", default="1,8", help="Input rows (a batch's tokens), comma-separated.")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--llama-cpp", action="store_true", help="Also time llama.cpp's kernels (test-backend-ops).")
    ap.add_argument("--test-backend-ops", default=str(billion_home() / f"llama.cpp-{VERSION}" / "bin" / "test-backend-ops"))
    ap.add_argument("--profile-model", default=None, help="Also profile torch decoding this model spec.")
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.llama_cpp and (args.out, args.inp) != GGML_SHAPE:
        ap.error(f"test-backend-ops times only m={GGML_SHAPE[0]}, k={GGML_SHAPE[1]}: "
                 f"use --out {GGML_SHAPE[0]} --in {GGML_SHAPE[1]} with --llama-cpp")
    if args.llama_cpp and not Path(args.test_backend_ops).is_file():
        ap.error(f"no {args.test_backend_ops}: run `bash scripts/setup_llamacpp.sh --tools`")

    started = time.time()
    model = None
    if args.profile_model:
        from billion.loading import resolve

        model = resolve(args.profile_model)  # once, before the timings: a download or conversion fails early
    torch.manual_seed(0)
    weights = [torch.randn(args.out, args.inp) for _ in range(args.layers)]
    all_threads = torch.get_num_threads()
    thread_counts = sorted({1, all_threads})
    cpu = host.chip_name()
    results = []
    print(f"{cpu}; {args.layers} x [{args.out} x {args.inp}] float32 = "
          f"{sum(w.numel() * 4 for w in weights) / 1e6:.0f} MB; torch {torch.__version__}, {all_threads} threads")
    for rows in rows_list:
        for name, nbytes, mats, call in kernels(weights, rows):
            row = {"kernel": name, "rows": rows, "bytes_per_pass": nbytes}
            for threads in thread_counts:
                torch.set_num_threads(threads)
                row[f"gbs_{threads}_threads"] = nbytes / timed(mats, call, args.repeats) / 1e9
            torch.set_num_threads(all_threads)
            results.append(row)
    if args.llama_cpp:
        results += llama_cpp_rows(Path(args.test_backend_ops), rows_list)
    print(f"GB/s of weights read ({' / '.join(f'{t} thr' for t in thread_counts)}):")
    print(f"  {'kernel':36s} " + "".join(f"{f'{r} row' + ('s' if r > 1 else ''):>16s}" for r in rows_list))
    for name in dict.fromkeys(r["kernel"] for r in results):
        cells = []
        for rows in rows_list:
            row = next((r for r in results if r["kernel"] == name and r["rows"] == rows), {})
            cells.append(" / ".join(f"{row[k]:5.1f}" if k in row else "    -" for k in
                                    (f"gbs_{t}_threads" for t in thread_counts)))
        print(f"  {name:36s} " + "".join(f"{c:>16s}" for c in cells))
    overhead = call_overhead_us()
    print("per call on a 64 x 64 weight: " + ", ".join(f"{k} {v:.1f} us" for k, v in overhead.items()))
    metrics = {"rows": results, "threads": all_threads, "call_overhead_us": overhead}
    if model is not None:
        metrics["decode_profile"] = profile_decode(model)
        print(f"torch decode of {args.profile_model} (prompt 128 tokens, 16 steps, float32), self CPU time:")
        for op in metrics["decode_profile"]:
            print(f"  {op['op']:55s} {op['share']:6.1%}  {op['calls']:6d} calls  {op['avg_us']:8.1f} us")
    record = make_record("cpu_matmul_probe", "torch", str(model) if model else "synthetic", vars(args), metrics,
                         started=started, source=model.source if model else None)
    print(f"record: {write_record(record, args.results_dir)}")


if __name__ == "__main__":
    main()
