"""`billion eval`: lm-evaluation-harness tasks on each engine, through one lm-eval model class."""

from __future__ import annotations

import click
from rich.table import Table

from billion.options import engines, load_options, model_options, results_option
from billion.ui import console, fmt


@click.command(name="eval")
@model_options
@click.option("--tasks", "-t", required=True, help="Comma list of lm-eval task (or group) names.")
@click.option("--include-path", type=click.Path(file_okay=False), default=None,
              help="A folder of task YAMLs of your own (searched before lm-eval's).")
@click.option("--num-fewshot", "-k", type=click.IntRange(0), default=None,
              help="Few-shot examples per prompt. Default: each task's own.")
@click.option("--limit", "-l", type=click.IntRange(1), default=None, help="Samples per task (the first N).")
@click.option("--apply-chat-template", is_flag=True, help="Render prompts with the model's chat template.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True,
              help="Rows per forward pass (log-likelihood requests), and generate-until requests decoded together.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Reuse the answers an interrupted run of the same settings already computed.")
@results_option
def eval_(model, backend, tasks, include_path, num_fewshot, limit, apply_chat_template, batch_size, resume,
          results_dir, **opts):
    """Run lm-evaluation-harness tasks on each engine (pip install "billion[eval]").

    lm-eval builds the prompts and computes the metrics; billion's engine answers its
    requests with the semantics of lm-eval's own Hugging Face model (log-likelihoods,
    rolling log-likelihoods, generation until stop strings), so results are comparable with
    `lm_eval --model hf`. The model is also registered with lm-eval as billion-mlx and
    billion-torch. Records: lm-eval's metrics per task and every sample's answer; with
    --backend all, the share of samples on which the engines agree and their largest
    log-likelihood difference.
    """
    from billion.loading import resolve
    from billion.runner import Runner, versus_first
    from billion.tasks import eval as task

    task.require_lm_eval()
    cfg = task.EvalConfig(tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), include_path=include_path,
                          num_fewshot=num_fewshot, limit=limit, apply_chat_template=apply_chat_template,
                          batch_size=batch_size)
    with console.status("indexing lm-eval tasks..."):
        manager = task.task_manager(cfg.include_path, cfg.tasks)
    done: dict[str, dict] = {}
    with Runner("eval", resolve(model), load_options(opts), cfg, results_dir) as runner:
        for run in runner.engines(engines(backend)):
            per_task = {}
            # answers are keyed by request, so what changes the answers is all the identity needs
            checkpoint = runner.checkpoint(run, {"lm_eval": task.lm_eval_version(), "tasks": cfg.tasks,
                                                 "num_fewshot": cfg.num_fewshot,
                                                 "chat": cfg.apply_chat_template}, resume)
            with console.status(f"  {run.name}: lm-eval {', '.join(cfg.tasks)}..."), runner.until_interrupted(run):
                per_task = task.run_engine(run.backend, cfg, manager, checkpoint)
            if not run.interrupted:
                checkpoint.remove()
            elif len(checkpoint.load()):
                console.print(f"  interrupted: {len(checkpoint.load())} requests answered are kept in "
                              f"{checkpoint.path}; rerun the same command to resume", soft_wrap=True)
            for t, out in per_task.items() or {None: {"metrics": {}, "samples": []}}.items():
                runner.record(run, out["metrics"], config={"task": t, "lm_eval": task.lm_eval_version()},
                              extra={"samples": out["samples"]})
            done[run.name] = per_task
        _print_table(model, done)
        for first, a, other, b in versus_first(done) if len(done) > 1 else ():
            for t in a.keys() & b.keys():
                agree = task.agreement(a[t]["samples"], b[t]["samples"])
                share = agree["same_answer_share"]
                console.print(f"[bold]{t}: {first} vs {other}[/]: same answer on "
                              f"{'-' if share is None else f'{share:.1%}'} of {agree['samples_compared']} samples; "
                              f"largest log-likelihood difference {fmt(agree['max_abs_loglik_diff'])}")
                runner.agreement(first, other, agree, config={"task": t})


def _print_table(model: str, done: dict) -> None:
    table = Table(title=f"lm-eval {model}")
    table.add_column("task")
    table.add_column("metric")
    for name in done:
        table.add_column(f"{name} (± s.e.)", justify="right")
    tasks = list(dict.fromkeys(t for per in done.values() for t in per))
    for t in tasks:
        metrics = next(per[t]["metrics"] for per in done.values() if t in per)
        for m in metrics:
            if m.endswith("_stderr") or m in ("samples", "num_fewshot") or "_stderr/" in m:
                continue
            cells = []
            for per in done.values():
                got = per.get(t, {}).get("metrics", {})
                value, se = got.get(m), got.get(m.replace("/", "_stderr/") if "/" in m else f"{m}_stderr")
                cells.append(fmt(value, 4) + (f" ± {fmt(se, 4)}" if isinstance(se, float) else ""))
            table.add_row(t, m, *cells)
    console.print(table)
