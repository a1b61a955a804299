"""`billion quant-bench`: bench figures per precision side by side, with ratios against full precision."""

from __future__ import annotations

from dataclasses import replace

import click
from rich.table import Table

from billion.options import QUANTIZE_CHOICES, bench_options, engines, load_options, model_options, results_option
from billion.ui import console, fmt

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
    from billion.loading import resolve
    from billion.runner import Runner
    from billion.tasks import bench as task
    from billion.tasks.compare import ratios

    picked = parse_precisions(precisions)
    cfg = task.BenchConfig(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, runs=runs, warmup=warmup, seed=seed)
    options = load_options(dict(device=device, dtype=dtype, group_size=group_size,
                                trust_remote_code=trust_remote_code))
    done: dict[tuple[str, str], dict] = {}
    with Runner("bench", resolve(model), options, cfg, results_dir) as runner:
        for name in engines(backend):
            for precision in picked:
                quantize = None if precision == FULL else precision
                for run in runner.engines([name], options=replace(options, quantize=quantize),
                                          label=f"{name} {precision}"):
                    console.print(f"  weights {run.info.weight_bytes / 1e9:.3f} GB")
                    result = task.BenchResult(cfg)
                    with runner.until_interrupted(run):
                        task.run_bench(run.backend, cfg, on_run=_progress(runs), result=result)
                    metrics = task.summarise(run.backend, result)
                    runner.record(run, metrics, config={"quantize": quantize},
                                  extra={"runs": [r.__dict__ for r in result.runs]})
                    done[(name, precision)] = metrics
                if runner.interrupted:
                    break
            if runner.interrupted:
                break
        _print_table(model, done, ratios)


def _progress(runs: int):
    def progress(kind, i, run):
        if run:
            console.print(f"  run {i}/{runs}: TTFT {run.ttft_s:.3f} s, decode {run.decode_tps:.2f} tok/s")

    return progress


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
