"""Why torch decodes slowly on a CPU: one token's matrix-vector products, kernel by kernel.

Decode is one token at a time, so each linear layer is a matrix-vector product that reads its
whole weight once: its speed is the bytes per second the kernel reads. This times, on weights
too large for any cache (--layers copies of a --out x --in matrix, read in turn), the kernels
torch can use for a float32 layer -- F.linear (MKL on x86 builds), the same with the weight
stored transposed, oneDNN with a pre-packed weight (what torch.compile's CPU freezing uses) --,
16-bit weights (oneDNN), dynamic int8 (fbgemm) and torchao's int8 weight-only, next to numpy's
BLAS on the same data, at 1 and at all threads. Medians of --repeats passes.

    .venv/bin/python scripts/cpu_matmul_probe.py                 # SmolLM2-135M's MLP shape
    .venv/bin/python scripts/cpu_matmul_probe.py --out 5632 --in 2048 --layers 8   # TinyLlama's

    .venv/bin/python scripts/cpu_matmul_probe.py --profile-model gguf:smollm2-135m   # where decode goes

Prints GB/s per kernel; writes one `cpu_matmul_probe` record under --results-dir. With
--profile-model, also torch's profiler over 16 decode steps of that model (billion's torch engine,
float32): the share of the time each operator takes, in the record too.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from billion.records.store import make_record, write_record

if TYPE_CHECKING:
    from billion.loading import ResolvedModel


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


def kernels(weights: list[torch.Tensor]):
    """(name, bytes read per pass, prepared weights, one-token call) for each kernel."""
    x = torch.randn(1, weights[0].shape[1])
    f32 = sum(w.numel() * 4 for w in weights)
    yield "torch F.linear float32", f32, weights, lambda w: nn.functional.linear(x, w)
    yield "torch x @ W^T, W stored transposed", f32, [w.t().contiguous() for w in weights], lambda w: x @ w
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    yield "torch oneDNN pre-packed float32", f32, packed, \
        lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    xb = x.bfloat16()
    yield "torch F.linear bfloat16", f32 // 2, [w.bfloat16() for w in weights], lambda w: nn.functional.linear(xb, w)
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
    xn = x.numpy()[0]
    yield "numpy W @ x float32 (its BLAS)", f32, [w.numpy() for w in weights], lambda w: w @ xn


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
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile-model", default=None, help="Also profile torch decoding this model spec.")
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()

    started = time.time()
    model = None
    if args.profile_model:
        from billion.loading import resolve

        model = resolve(args.profile_model)  # once, before the timings: a download or conversion fails early
    torch.manual_seed(0)
    weights = [torch.randn(args.out, args.inp) for _ in range(args.layers)]
    all_threads = torch.get_num_threads()
    rows = []
    print(f"{args.layers} x [{args.out} x {args.inp}] float32 = {sum(w.numel() * 4 for w in weights) / 1e6:.0f} MB; "
          f"torch {torch.__version__}, {all_threads} threads")
    for name, nbytes, mats, call in kernels(weights):
        row = {"kernel": name, "bytes_per_pass": nbytes}
        for threads in sorted({1, all_threads}):
            torch.set_num_threads(threads)
            seconds = timed(mats, call, args.repeats)
            row[f"gbs_{threads}_threads"] = nbytes / seconds / 1e9
            row[f"ms_{threads}_threads"] = seconds * 1e3
        torch.set_num_threads(all_threads)
        rows.append(row)
        print(f"  {name:38s} " + "  ".join(f"{t} thr {row[f'gbs_{t}_threads']:5.1f} GB/s ({row[f'ms_{t}_threads']:6.2f} ms)"
                                           for t in sorted({1, all_threads})))
    metrics = {"rows": rows, "threads": all_threads}
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
