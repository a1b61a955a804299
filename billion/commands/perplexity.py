"""`billion perplexity`: a text's perplexity per engine, windowed as lm-eval's rolling log-likelihood."""

from __future__ import annotations

import click
from rich.table import Table

from billion.options import engines, load_options, model_options, results_option
from billion.tasks.perplexity import PerplexityConfig
from billion.ui import console, fmt


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
    from billion.loading import resolve
    from billion.runner import Runner, versus_first
    from billion.tasks import perplexity as task
    from billion.tasks.quality import read_text

    text, label = read_text(text_file)
    cfg = PerplexityConfig(ctx=ctx, stride=stride)
    done = {}
    with Runner("perplexity", resolve(model), load_options(opts), cfg, results_dir) as runner:
        for run in runner.engines(engines(backend)):
            result = task.PerplexityResult()
            with console.status(f"  {run.name}: scoring {label}...") as status, runner.until_interrupted(run):
                task.measure(run.backend, text, cfg, lambda i, n: status.update(f"  {run.name}: window {i}/{n}"),
                             result=result)
            runner.record(run, result.metrics(), config={"text": label})
            done[run.name] = result
        _print_table(model, label, ctx, stride, done)
        for first, a, other, b in versus_first(done) if len(done) > 1 and not runner.interrupted else ():
            agree = task.agreement(a, b)
            console.print(f"[bold]{first} vs {other}[/]: largest per-token log-probability difference "
                          f"{fmt(agree.get('max_abs_token_logprob_diff'))}, ln PPL difference "
                          f"{fmt(agree.get('ln_ppl_diff'))} over {agree['tokens_compared']} tokens")
            runner.agreement(first, other, agree, config={"text": label})


def _print_table(model, label, ctx, stride, done: dict) -> None:
    table = Table(title=f"perplexity {model}: {label}, ctx {ctx}, stride {stride or ctx} (lm-eval rolling windows)")
    for col in ("engine", "tokens scored", "windows", "NLL / token", "perplexity"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for name, r in done.items():
        m = r.metrics()
        table.add_row(name, str(m["tokens_scored"]), str(m["windows"]), fmt(m["nll_per_token"], 4),
                      fmt(m["perplexity"], 3))
    console.print(table)
