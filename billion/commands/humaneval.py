"""`billion humaneval`: pass@1 on HumanEval per engine, each completion run in a sandboxed subprocess."""

from __future__ import annotations

import time

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from billion.tasks.humaneval import REFUSAL, HumanEvalConfig
from billion.commands import (console, engines, fmt, load_kwargs, loaded, model_options, print_engine,
                              results_option, versus_first, write_agreement)


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
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Reuse problems an interrupted run of the same settings already solved.")
@results_option
def humaneval(model, backend, limit, max_tokens, timeout_s, confirm_run_unsafe_code, resume, results_dir, **opts):
    """HumanEval pass@1: greedy completions of the 164 problems, each tested in a sandbox.

    Completions stop at HumanEval's stop sequences ("\\nclass", "\\ndef", "\\n#", "\\nif",
    "\\nprint"); each program (prompt + completion + tests) runs in its own subprocess with a
    time limit, in a temporary folder, without network. Only with --confirm-run-unsafe-code.
    With --backend all: the share of problems where the engines wrote the same completion.
    Ctrl-C keeps what was solved; rerunning the same command resumes.
    """
    if not confirm_run_unsafe_code:
        raise click.ClickException(REFUSAL)
    from billion.tasks import humaneval as task
    from billion.records.store import make_record, write_record

    problems = task.load_problems()
    cfg = HumanEvalConfig(limit=limit, max_tokens=max_tokens, timeout_s=timeout_s)
    total = len(problems[:limit])
    done, interrupted = {}, False
    for name in engines(backend):
        started = time.time()
        with loaded(name, model, **load_kwargs(opts)) as b:
            info = b.info()
            print_engine(name, info)
            identity = {"model": model, "backend": name, **load_kwargs(opts), "device_used": info.device,
                        "max_tokens": max_tokens, "timeout_s": timeout_s}
            checkpoint = task.Checkpoint(results_dir, identity)
            if not resume:
                checkpoint.remove()
            with Progress(TextColumn(f"  {name} HumanEval"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=console, transient=True) as bar:
                progress = bar.add_task("humaneval", total=total)
                previous = checkpoint.load()
                bar.advance(progress, len([k for k in previous if k in {p.task_id for p in problems[:limit]}]))

                def solved(s):
                    checkpoint.append(s)
                    bar.advance(progress, 1)

                result = task.run(b, problems, cfg, done=previous, on_solved=solved)
        resumed = len(result.solved) - result.new
        if resumed:
            console.print(f"  resumed {resumed} problems already solved ({checkpoint.path})")
        metrics = task.summarise(result)
        record = make_record("humaneval", name, model, {**task.config_dict(cfg), **load_kwargs(opts)}, metrics,
                             started=started, status="interrupted" if result.interrupted else "complete",
                             extra={"samples": [s.__dict__ for s in result.solved.values()],
                                    "model_info": info.__dict__})
        console.print(f"  {name}: pass@1 {fmt(metrics['pass_at_1'], 3)} ({metrics['passed']}/{metrics['problems']})")
        console.print(f"  record: {write_record(record, results_dir)}")
        done[name] = result
        if result.interrupted:
            console.print(f"  interrupted: {len(result.solved)}/{total} solved; rerun the same command to resume")
            interrupted = True
            break
        checkpoint.remove()

    if len(done) > 1:
        for first, a, other, b in versus_first(done):
            agree = task.agreement(a, b)
            console.print(f"[bold]{first} vs {other}[/]: same completion on "
                          f"{fmt(agree.get('same_completion_share'), 3)}, same outcome on "
                          f"{fmt(agree.get('same_outcome_share'), 3)} of {agree['problems_compared']} problems")
            write_agreement("humaneval", first, other, model, task.config_dict(cfg), agree, results_dir)
    if interrupted:
        raise KeyboardInterrupt
