"""`billion quality`: what int8/int4 weights cost, against full precision on the same engine."""

from __future__ import annotations

import time
from dataclasses import replace

import click
from rich.table import Table

from billion.options import engines, load_options, mmlu_options, model_options, results_option
from billion.tasks.quality import QualityConfig
from billion.ui import console, fmt


@click.command()
@model_options(skip=("compile",))
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
              help="Text to score. Default: a fixed ~700-word text shipped with billion.")
@click.option("--ctx", type=click.IntRange(4), default=QualityConfig.ctx, show_default=True,
              help="Window length in tokens; the second half of each window is scored.")
@click.option("--chunks", type=click.IntRange(1), default=QualityConfig.chunks, show_default=True,
              help="Windows scored at most.")
@click.option("--mmlu/--no-mmlu", default=False, show_default=True,
              help="Also run MMLU on every model and report the accuracy difference.")
@mmlu_options(prefix="mmlu-")
@results_option
def quality(model, backend, text_file, ctx, chunks, mmlu, results_dir, **opts):
    """KL divergence, top-1 agreement and perplexity of quantized weights against full precision.

    Measured like llama.cpp's `llama-perplexity --kl-divergence`: the same model in full
    precision and quantized (--quantize int8|int4|...; default: int8 then int4), on the same
    engine, position by position over a fixed text. With --mmlu, the MMLU accuracy of each
    model too (see `billion mmlu` for its options, here prefixed --mmlu-).
    """
    from billion.evaluation import mmlu_options_of
    from billion.loading import resolve
    from billion.runner import EngineRun, Runner
    from billion.tasks import quality as task

    mmlu_opts = mmlu_options_of(opts)
    options = load_options(opts)
    schemes = [options.quantize] if options.quantize else ["int8", "int4"]
    text, text_label = task.read_text(text_file)
    cfg = task.QualityConfig(ctx=ctx, chunks=chunks)
    evaluate, mmlu_cfg = (_mmlu_evaluation(mmlu_opts) if mmlu else (None, None))
    rows = []
    with Runner("quality", resolve(model), options, cfg, results_dir) as runner:
        for name in engines(backend):
            run = EngineRun(name, None, None, time.time())  # it loads one model per precision itself

            def load_one(scheme):  # measure() closes each model before the next loads
                return runner.load(name, options=replace(options, quantize=scheme),
                                   label=f"{model} ({scheme or 'full precision'})")

            result = task.QualityResult({})
            with runner.until_interrupted(run):
                task.measure(load_one, schemes, text, cfg, evaluate=evaluate, result=result,
                             on_step=lambda scheme, i, n: console.print(f"  {name} {scheme}: window {i}/{n}"))
            for scheme, metrics in result.metrics.items():
                metrics = dict(metrics)
                if mmlu_cfg and scheme in result.evaluated and "full" in result.evaluated:
                    metrics.update(_mmlu_difference(result.evaluated["full"], result.evaluated[scheme], mmlu_cfg))
                runner.record(run, metrics, config={"quantize": scheme, "text": text_label,
                                                    **({"mmlu": mmlu_opts} if mmlu_cfg else {})})
                rows.append((name, scheme, metrics))
            if run.interrupted:
                break
        _print_table(model, rows)


def _mmlu_evaluation(mmlu_opts: dict):
    """(evaluate(backend), MMLUConfig): MMLU on every model quality loads, questions loaded first."""
    from billion.evaluation import prepare_mmlu
    from billion.tasks import mmlu as mmlu_task

    subjects, mmlu_cfg = prepare_mmlu(**mmlu_opts)

    def evaluate(b):
        with console.status(f"MMLU on {b.name} ({b.quantization or 'full precision'})..."):
            return mmlu_task.run_mmlu(b, subjects, mmlu_cfg)

    return evaluate, mmlu_cfg


def _mmlu_difference(full, quant, cfg) -> dict:
    from billion.tasks import mmlu as mmlu_task

    a = mmlu_task.summarise(full, list(cfg.subjects))
    b = mmlu_task.summarise(quant, list(cfg.subjects))
    out = {"mmlu_acc_full": a.get("acc_micro"), "mmlu_acc_quant": b.get("acc_micro"),
           "mmlu_questions": b.get("questions")}
    if out["mmlu_acc_full"] is not None and out["mmlu_acc_quant"] is not None:
        out["mmlu_acc_diff"] = out["mmlu_acc_quant"] - out["mmlu_acc_full"]
    agree = mmlu_task.agreement(full, quant)
    out["mmlu_same_answer_share"] = agree.get("same_answer_share")
    return out


def _print_table(model: str, rows: list) -> None:
    table = Table(title=f"quality {model}: quantized vs full precision, same engine")
    columns = ["engine", "weights", "mean KL (± se)", "median KL", "p99 KL", "max KL", "top-1 agree",
               "PPL full", "PPL quant"]
    if any("mmlu_acc_diff" in m for _, _, m in rows):
        columns.append("MMLU Δacc")
    for col in columns:
        table.add_column(col, justify="left" if col in ("engine", "weights") else "right")
    for name, scheme, m in rows:
        cells = [name, scheme, f"{m['mean_kl']:.3g} ± {m['mean_kl_stderr']:.1g}", f"{m['median_kl']:.3g}",
                 f"{m['p99_kl']:.3g}", f"{m['max_kl']:.3g}", f"{m['top1_agreement']:.1%}", fmt(m["ppl_full"]),
                 fmt(m["ppl_quant"])]
        if "MMLU Δacc" in columns:
            cells.append(f"{m['mmlu_acc_diff']:+.1%}" if m.get("mmlu_acc_diff") is not None else "-")
        table.add_row(*cells)
    console.print(table)
    for name, scheme, m in rows:
        if m.get("mmlu_acc_diff") is not None:
            console.print(f"{name} {scheme}: MMLU accuracy {m['mmlu_acc_full']:.1%} -> {m['mmlu_acc_quant']:.1%} "
                          f"({m['mmlu_acc_diff']:+.1%}; same answer on {m['mmlu_same_answer_share']:.0%} of "
                          f"{m['mmlu_questions']} questions)")
