"""`billion finetune`: LoRA fine-tuning on one or both engines, from the same data."""

from __future__ import annotations

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from backends.training import TrainConfig
from billion.options import engines, load_options, model_options, results_option
from billion.tasks.finetune import FinetuneConfig
from billion.ui import console, fmt


@click.command()
@model_options(skip=("compile",))
@click.option("--data", "-d", default=FinetuneConfig.data, show_default=True,
              help="JSONL file ({text} / {prompt,completion} / alpaca / {messages}), a folder with train.jsonl "
                   "(and valid.jsonl, used instead of --val-split), "
                   "a Hub data set (org/name), or `sample` (100 built-in instructions).")
@click.option("--rank", "lora_rank", type=click.IntRange(1), default=TrainConfig.rank, show_default=True,
              help="LoRA rank r.")
@click.option("--alpha", type=float, default=TrainConfig.alpha, show_default=True,
              help="LoRA alpha (scale = alpha / r).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=TrainConfig.dropout, show_default=True)
@click.option("--targets", default=None,
              help="Comma list of layer names to adapt. Default per architecture: q_proj,v_proj (Llama, "
                   "StableLM), query_key_value (GPT-NeoX).")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=FinetuneConfig.epochs, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=None, help="Optimiser steps (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(1), default=TrainConfig.batch_size, show_default=True)
@click.option("--grad-accum", type=click.IntRange(1), default=TrainConfig.grad_accum, show_default=True,
              help="Micro-batches per optimiser step.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=TrainConfig.learning_rate, show_default=True,
              help="Peak learning rate (AdamW, linear decay to 0).")
@click.option("--max-grad-norm", type=click.FloatRange(0), default=TrainConfig.max_grad_norm, show_default=True,
              help="0: no clipping.")
@click.option("--max-seq-len", type=click.IntRange(2), default=TrainConfig.max_seq_len, show_default=True)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--val-split", type=float, default=FinetuneConfig.val_split, show_default=True,
              help="Share of examples held out.")
@click.option("--eval-every", type=click.IntRange(1), default=TrainConfig.eval_every, show_default=True,
              help="Validation every N steps.")
@click.option("--save-every", type=click.IntRange(1), default=TrainConfig.save_every, show_default=True,
              help="Checkpoint every N steps.")
@click.option("--chat/--no-chat", default=None,
              help="Put instruction rows through the chat template. Default: when the model has one.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt for the before/after table (repeatable).")
@click.option("--answer-tokens", type=click.IntRange(1), default=FinetuneConfig.answer_tokens, show_default=True)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Adapter folder (one sub-folder per engine). Default: adapters/<model>.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.")
@click.option("--fuse", is_flag=True, help="Also write the model with the adapter merged in (<out>/<engine>-fused).")
@results_option
def finetune(model, backend, data, lora_rank, alpha, dropout, targets, epochs, steps, batch_size, grad_accum, lr,
             max_grad_norm, max_seq_len, seed, val_split, eval_every, save_every, chat, prompts, answer_tokens,
             out_dir, resume, fuse, results_dir, **opts):
    """LoRA fine-tuning: mlx-lm's tuner on MLX, peft + trl's SFTTrainer on torch.

    Both engines train on the same token ids and loss masks in the same batch order,
    so their losses can be compared step by step. Prints answers to a few prompts
    (greedy) before and after, streams loss, validation loss, token accuracy, learning
    rate, tokens/s and peak memory, and writes one JSON record per engine. Ctrl-C keeps
    the last checkpoint; --resume continues from it. Under torchrun / accelerate launch
    (torch) or mlx.launch (MLX) it trains data-parallel.
    """
    from billion.loading import resolve
    from billion.records.store import _slug
    from billion.runner import Runner
    from billion.tasks import finetune as task

    tcfg = TrainConfig(rank=lora_rank, alpha=alpha, dropout=dropout,
                       targets=tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else (),
                       batch_size=batch_size, grad_accum=grad_accum, learning_rate=lr, max_grad_norm=max_grad_norm,
                       max_seq_len=max_seq_len, seed=seed, eval_every=eval_every, save_every=save_every)
    cfg = task.FinetuneConfig(data=data, epochs=epochs, steps=steps, val_split=val_split, chat=chat,
                              prompts=tuple(prompts) or task.DEFAULT_PROMPTS, answer_tokens=answer_tokens,
                              out_dir=out_dir or f"adapters/{_slug(model)}", resume=resume, fuse=fuse, train=tcfg)
    main = task.is_main_process()
    say = console.print if main else (lambda *a, **k: None)
    prepared, runs = None, {}
    with Runner("finetune", resolve(model), load_options(opts), cfg, results_dir) as runner:
        for run in runner.engines(engines(backend), parameters=True):
            if prepared is None:  # tokenized once: every engine trains on these ids and masks
                prepared = task.prepare(run.backend, cfg)
                say(_data_line(prepared, data))
            trained = _train_with_progress(task, run.backend, runner.model, cfg, prepared, main)
            if trained.result.interrupted:  # the trainer stopped at Ctrl-C, keeping its last checkpoint
                runner.stop(run)
            if main:
                runner.record(run, task.metrics(trained), settings=task.config_dict(cfg, prepared),
                              extra=task.record_extra(trained, prepared, cfg))
                say(f"  adapter: {trained.adapter_dir}"
                    + (f"; fused model: {trained.fused_dir}" if trained.fused_dir else ""))
                _answers_table(run.name, cfg.prompts, trained)
            runs[run.name] = trained
            if run.interrupted:
                say(f"interrupted after step {trained.result.steps_done}; continue with --resume")
        if main and not runner.interrupted:
            _summary(model, runs, task)


def _data_line(prepared, data) -> str:
    t = prepared.train_config
    return (f"data: {len(prepared.train)} train / {len(prepared.val)} validation examples from {data}"
            f"{' (chat template)' if prepared.chat else ''}"
            + (f", {prepared.dropped} dropped (no target within --max-seq-len)" if prepared.dropped else "")
            + f"; {t.steps} steps of {t.batch_size} x {t.grad_accum} examples")


def _train_with_progress(task, backend, model, cfg, prepared, main):
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[metrics]}")]
    with Progress(*columns, console=console, disable=not main, transient=False) as progress:
        bar = None  # added at the first phase: folder checks come before it and may refuse

        def on_step(m):
            text = (f"loss {m.loss:.4f}  acc {m.token_accuracy:.3f}  lr {m.learning_rate:.2e}  "
                    f"{m.tokens_per_s:,.0f} tok/s")
            if m.val_loss is not None:
                text += f"  val {m.val_loss:.4f}"
                progress.console.print(f"  step {m.step}: {text}")
            progress.update(bar, completed=m.step, metrics=text)

        def on_phase(text):
            nonlocal bar
            if bar is None:
                bar = progress.add_task(backend.name, total=prepared.train_config.steps, metrics="")
            progress.update(bar, description=f"{backend.name}: {text}")

        return task.run(backend, str(model), cfg, prepared, on_step=on_step, on_phase=on_phase)


def _answers_table(name, prompts, run) -> None:
    if not run.before:
        return
    table = Table(title=f"{name}: greedy answers before / after", show_lines=True)
    for col in ("prompt", "before", "after"):
        table.add_column(col, overflow="fold")
    for p, b, a in zip(prompts, run.before, run.after or ["-"] * len(run.before)):
        table.add_row(p, b, a)
    console.print(table)


def _summary(model, runs, task) -> None:
    table = Table(title=f"finetune {model}")
    for col in ("engine", "steps", "train loss first -> last", "val loss before -> after", "token acc",
                "train tok/s", "train s", "peak GB (source)"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for name, run in runs.items():
        m = task.metrics(run)
        table.add_row(name, f"{m['steps_done']}/{m['total_steps']}",
                      f"{fmt(m['train_loss_first'], 4)} -> {fmt(m['train_loss_final'], 4)}",
                      f"{fmt(m['val_loss_initial'], 4)} -> {fmt(m['val_loss_final'], 4)}",
                      fmt(m["token_accuracy_final"], 3), fmt(m["train_tokens_per_s"]), fmt(m["train_time_s"]),
                      f"{fmt(m['peak_memory_gb'])} ({m['memory_source']})")
    console.print(table)
    if len(runs) > 1:
        (a, ra), *rest = runs.items()
        for b, rb in rest:
            la = {h.step: h.loss for h in ra.result.history}
            lb = {h.step: h.loss for h in rb.result.history}
            common = sorted(set(la) & set(lb))
            if common:
                diff = max(abs(la[s] - lb[s]) for s in common)
                console.print(f"step losses {a} vs {b}: max |difference| {diff:.2e} over {len(common)} steps "
                              f"(same data, order and initial adapter; dropout draws differ unless --dropout 0)")
