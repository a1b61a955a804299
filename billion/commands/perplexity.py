"""`billion perplexity`: a text's perplexity per engine, windowed as lm-eval's rolling log-likelihood."""

from __future__ import annotations

import time

import click
from rich.table import Table

from billion.tasks.perplexity import PerplexityConfig
from billion.commands import (console, engines, fmt, load_kwargs, loaded, model_options, print_engine,
                              results_option, versus_first, write_agreement)


@click.command()
@model_options(skip=("compile",))
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
              help="Text file to score. Default: billion/data/quality_text.txt.")
@click.option("--ctx", type=click.IntRange(2), default=PerplexityConfig.ctx, show_default=True,
              help="Window length in tokens (capped at the model's context).")
@click.option("--stride", type=click.IntRange(1), default=None,
              help="Tokens scored per window after the first, each with ctx - stride tokens of context. "
                   "Default: --ctx (disjoint windows: lm-eval's loglikelihood_rolling exactly).")
@results_option
def perplexity(model, backend, text_file, ctx, stride, results_dir, **opts):
    """Perplexity of a text file on each engine, and how closely the engines agree.

    Windowed as lm-evaluation-harness's rolling log-likelihood (not llama-perplexity's
    second-half windows): the text's tokens, after a BOS (else EOS) prefix, in windows of
    --ctx tokens; the first window scores all its tokens, each later one the next --stride
    tokens with the ctx - stride tokens before them as context, so every token is scored
    once. With --backend all: the largest per-token log-probability difference between
    engines. Ctrl-C keeps the windows scored.
    """
    from billion.tasks import perplexity as task
    from billion.tasks.quality import read_text
    from billion.records.store import make_record, write_record

    text, label = read_text(text_file)
    cfg = PerplexityConfig(ctx=ctx, stride=stride)
    done, interrupted = {}, False
    for name in engines(backend):
        started = time.time()
        with loaded(name, model, **load_kwargs(opts)) as b:
            info = b.info()
            print_engine(name, info)
            with console.status(f"  {name}: scoring {label}...") as status:
                result = task.measure(b, text, cfg, lambda i, n: status.update(f"  {name}: window {i}/{n}"))
        metrics = result.metrics()
        record = make_record("perplexity", name, model, {**task.config_dict(cfg), **load_kwargs(opts), "text": label},
                             metrics, started=started, status="interrupted" if result.interrupted else "complete",
                             extra={"model_info": info.__dict__})
        console.print(f"  record: {write_record(record, results_dir)}")
        done[name] = result
        if result.interrupted:
            interrupted = True
            break

    table = Table(title=f"perplexity {model}: {label}, ctx {ctx}, stride {stride or ctx} (lm-eval rolling windows)")
    for col in ("engine", "tokens scored", "windows", "NLL / token", "perplexity"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for name, r in done.items():
        m = r.metrics()
        table.add_row(name, str(m["tokens_scored"]), str(m["windows"]), fmt(m["nll_per_token"], 4),
                      fmt(m["perplexity"], 3))
    console.print(table)
    if len(done) > 1 and not interrupted:
        for first, a, other, b in versus_first(done):
            agree = task.agreement(a, b)
            console.print(f"[bold]{first} vs {other}[/]: largest per-token log-probability difference "
                          f"{fmt(agree.get('max_abs_token_logprob_diff'))}, ln PPL difference "
                          f"{fmt(agree.get('ln_ppl_diff'))} over {agree['tokens_compared']} tokens")
            write_agreement("perplexity", first, other, model, {**task.config_dict(cfg), "text": label}, agree,
                            results_dir)
    if interrupted:
        raise KeyboardInterrupt
