"""`billion quant-bench`: bench figures per precision side by side, with ratios against full precision."""

from __future__ import annotations

import time

import click
from rich.table import Table

from billion.commands import (QUANTIZE_CHOICES, bench_options, console, engines, fmt, loaded, model_options,
                              results_option)

FULL = "full"


def parse_precisions(text: str) -> list[str]:
    from backends.types import UserError

    picked = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in picked if p != FULL and p not in QUANTIZE_CHOICES]
    if unknown or not picked:
        raise UserError(f"unknown precision {', '.join(unknown) or text!r}; "
                        f"choose from {FULL}, {', '.join(QUANTIZE_CHOICES)}")
    return list(dict.fromkeys(picked))


@click.command("quant-bench")
@model_options(skip=("quantize", "compile"))
@click.option("--precisions", default="full,int8,int4", show_default=True,
              help=f"Comma list of: {FULL}, {', '.join(QUANTIZE_CHOICES)}.")
@bench_options
@results_option
def quant_bench(model, backend, precisions, device, dtype, group_size, trust_remote_code, prompt_tokens,
                gen_tokens, runs, warmup, seed, results_dir):
    """Speed and memory of full precision, int8 and int4 weights, side by side.

    For each engine and precision: prefill and decode speed, peak memory, weight bytes as
    stored (packed), and the share of the memory-bandwidth ceiling reached, computed from
    the bytes a decode step reads at that precision. Ratios are against the engine's own
    full precision. One `bench` record per engine and precision.
    """
    from billion.tasks import bench as task
    from billion.tasks.compare import ratios
    from billion.records.store import make_record, write_record

    picked = parse_precisions(precisions)
    cfg = task.BenchConfig(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, runs=runs, warmup=warmup, seed=seed)
    done: dict[tuple[str, str], dict] = {}
    interrupted = False
    for name in engines(backend):
        for precision in picked:
            quantize = None if precision == FULL else precision
            kw = dict(device=device, dtype=dtype, trust_remote_code=trust_remote_code, quantize=quantize,
                      group_size=group_size)
            started = time.time()
            with loaded(name, model, **kw) as b:
                info = b.info()
                console.print(f"[bold]{name} {precision}[/]: {info.quantization or info.dtype}, "
                              f"weights {info.weight_bytes / 1e9:.3f} GB")

                def progress(kind, i, run):
                    if run:
                        console.print(f"  run {i}/{runs}: TTFT {run.ttft_s:.3f} s, decode {run.decode_tps:.2f} tok/s")

                result = task.run_bench(b, cfg, on_run=progress)
                status = "interrupted" if result.interrupted else "complete"
                record = make_record("bench", name, model, {**task.config_dict(cfg), **kw}, result.metrics,
                                     started=started, status=status,
                                     extra={"model_info": info.__dict__, "runs": [r.__dict__ for r in result.runs]})
                console.print(f"  record: {write_record(record, results_dir)}")
                done[(name, precision)] = result.metrics
            if result.interrupted:
                interrupted = True
                break
        if interrupted:
            break
    _print_table(model, done, ratios)
    if interrupted:
        raise KeyboardInterrupt


def _print_table(model: str, done: dict, ratios) -> None:
    table = Table(title=f"quant-bench {model} (ratios against the engine's full precision)")
    for col in ("engine", "weights", "prefill tok/s", "decode tok/s", "×", "% BW", "weights GB", "×", "peak GB", "×"):
        table.add_column(col, justify="left" if col in ("engine", "weights") else "right")
    for (name, precision), m in done.items():
        base = done.get((name, FULL))
        r = ratios(base, m) if base else {}

        def ratio(key):
            return f"{r[key]:.2f}" if key in r else "-"

        frac = m.get("bandwidth_fraction")
        table.add_row(name, precision, fmt(m.get("prefill_tps")), fmt(m.get("decode_tps")), ratio("decode_tps"),
                      f"{frac:.0%}" if frac else "-", fmt(m["weight_gb"], 3), ratio("weight_gb"),
                      fmt(m["peak_memory_gb"], 3), ratio("peak_memory_gb"))
    console.print(table)
    for (name, precision), m in done.items():
        if m.get("bandwidth_fault"):
            console.print(f"  [red]{name} {precision}: measurement fault, no % BW: {m['bandwidth_fault']}[/]")
