"""`billion mmlu`: MMLU accuracy per engine, scored like lm-evaluation-harness, resumable."""

from __future__ import annotations

import time

import click
from rich.table import Table

from billion.commands import (console, engines, evaluate_mmlu, fmt, load_kwargs, loaded, mmlu_options, model_options,
                              prepare_mmlu, print_engine, results_option, versus_first, write_agreement,
                              write_mmlu_record)


@click.command()
@model_options(skip=("compile",))
@mmlu_options()
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Reuse questions an interrupted run of the same settings already scored.")
@results_option
def mmlu(model, backend, shots, method, subjects, limit, data, batch_size, max_tokens, resume, results_dir, **opts):
    """MMLU accuracy, scored like lm-evaluation-harness (5-shot log-likelihood by default).

    Each question is prompted with the subject header and the first --shots solved dev
    questions; the answer is the letter whose continuation (" A" ... " D") is most likely.
    With --backend all, the engines run in turn on the same weights and the share of
    questions where they chose the same answer is reported. Ctrl-C keeps what was scored;
    rerunning the same command resumes.
    """
    from billion.tasks import mmlu as task

    subject_data, cfg = prepare_mmlu(shots, method, subjects, limit, data, batch_size, max_tokens)
    names = engines(backend)
    done, interrupted = {}, False
    for name in names:
        started = time.time()
        with loaded(name, model, **load_kwargs(opts)) as b:
            info = b.info()
            print_engine(name, info)
            result = evaluate_mmlu(b, model, subject_data, cfg, results_dir, opts, resume)
        done[name] = (result, write_mmlu_record(name, model, cfg, result, info, opts, results_dir, started))
        if result.interrupted:
            interrupted = True
            break

    print_table(model, cfg, {n: m for n, (_, m) in done.items()})
    if len(done) > 1:
        for first, (ra, _), other, (rb, _) in versus_first(done):
            agree = task.agreement(ra, rb)
            share = agree.get("same_answer_share")
            console.print(f"[bold]{first} vs {other}[/]: same answer on "
                          f"{'-' if share is None else f'{share:.1%}'} of {agree['questions_compared']} "
                          f"questions; largest log-likelihood difference {fmt(agree.get('max_abs_loglik_diff'))}")
            write_agreement("mmlu", first, other, model, task.config_dict(cfg), agree, results_dir)
    if interrupted:
        raise KeyboardInterrupt


def _acc(m: dict | None) -> str:
    if not m or m.get("acc") is None:
        return "-"
    se = m.get("acc_stderr")
    return f"{m['acc']:.1%}" + (f" ± {se:.1%}" if se is not None else "")


def print_table(model: str, cfg, done: dict) -> None:
    """Accuracy per subject (rows) per engine (columns), then micro/macro and speed."""
    table = Table(title=f"MMLU {model}: {cfg.shots}-shot, {cfg.method}"
                        + (" (generate-and-parse, not lm-eval's method)" if cfg.method == "generate" else ""))
    table.add_column("subject")
    table.add_column("questions", justify="right")
    for name in done:
        table.add_column(f"{name} acc ± s.e.", justify="right")
    for subject in cfg.subjects:
        rows = [done[n]["per_subject"].get(subject) for n in done]
        n = next((r["questions"] for r in rows if r), 0)
        table.add_row(subject, str(n), *(_acc(r) for r in rows))
    table.add_section()
    first = next(iter(done.values()), {})
    table.add_row("micro (all questions)", str(first.get("questions", 0)),
                  *(_acc({"acc": m.get("acc_micro"), "acc_stderr": m.get("acc_micro_stderr")}) for m in done.values()))
    table.add_row("macro (mean of subjects)", str(first.get("subjects", 0)),
                  *(_acc({"acc": m.get("acc_macro"), "acc_stderr": m.get("acc_macro_stderr")}) for m in done.values()))
    table.add_row("questions/s", "", *(fmt(m.get("questions_per_s")) for m in done.values()))
    table.add_row("prompt tokens (mean)", "", *(fmt(m.get("prompt_tokens_mean"), 0) for m in done.values()))
    if any(m.get("truncated_prompts") for m in done.values()):
        table.add_row("prompts cut to fit", "", *(str(m.get("truncated_prompts")) for m in done.values()))
    if cfg.method == "generate":
        table.add_row("no letter parsed", "", *(str(m.get("unparsed_answers")) for m in done.values()))
    console.print(table)
