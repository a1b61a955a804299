"""`billion mmlu`: MMLU accuracy per engine, scored like lm-evaluation-harness, resumable."""

from __future__ import annotations

import click
from rich.table import Table

from billion.options import engines, load_options, mmlu_options, model_options, results_option
from billion.ui import console, fmt


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
    from billion.evaluation import evaluate_mmlu, mmlu_record_parts, prepare_mmlu
    from billion.loading import resolve
    from billion.runner import Runner, versus_first
    from billion.tasks import mmlu as task

    subject_data, cfg = prepare_mmlu(shots, method, subjects, limit, data, batch_size, max_tokens)
    done = {}
    with Runner("mmlu", resolve(model), load_options(opts), cfg, results_dir) as runner:
        for run in runner.engines(engines(backend)):
            result = evaluate_mmlu(runner, run, subject_data, cfg, resume)
            metrics, extra = mmlu_record_parts(result, cfg)
            runner.record(run, {k: v for k, v in metrics.items() if k != "per_subject"}, extra=extra)
            done[run.name] = (result, metrics)
        print_table(model, cfg, {n: m for n, (_, m) in done.items()})
        for first, (ra, _), other, (rb, _) in versus_first(done) if len(done) > 1 else ():
            agree = task.agreement(ra, rb)
            share = agree.get("same_answer_share")
            console.print(f"[bold]{first} vs {other}[/]: same answer on "
                          f"{'-' if share is None else f'{share:.1%}'} of {agree['questions_compared']} "
                          f"questions; largest log-likelihood difference {fmt(agree.get('max_abs_loglik_diff'))}")
            runner.agreement(first, other, agree)


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
