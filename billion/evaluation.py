"""MMLU on a loaded engine as the commands run it (billion mmlu, bench --mmlu): the questions
loaded before any model, a progress bar, the checkpoint that makes a rerun resume, and the record.
The scoring itself is billion/tasks/mmlu.py."""

from __future__ import annotations

from dataclasses import asdict

from billion.runner import EngineRun, Runner, end_checkpoint
from billion.tasks import mmlu, mmlu_data
from billion.ui import console, progress_bar


def prepare_mmlu(shots, method, subjects, limit, data, batch_size, max_tokens):
    """(subject data, MMLUConfig): loads the questions before any model, so missing data fails fast."""
    available = mmlu_data.local_subjects(data) if data else None
    names = mmlu_data.parse_subjects(subjects, available)
    with console.status(f"loading MMLU ({len(names)} subjects) from {mmlu_data.describe_source(data)}..."):
        loaded_subjects = mmlu_data.load_subjects(names, data)
    cfg = mmlu.MMLUConfig(subjects=tuple(names), shots=shots, method=method, limit=limit, batch_size=batch_size,
                          max_tokens=max_tokens, data=mmlu_data.describe_source(data))
    return loaded_subjects, cfg


def mmlu_options_of(opts: dict, prefix: str = "mmlu_") -> dict:
    """The --mmlu-* options of bench and quality, without their prefix (prepare_mmlu's arguments)."""
    return {k[len(prefix):]: opts.pop(k) for k in list(opts) if k.startswith(prefix)}


def evaluate_mmlu(runner: Runner, run: EngineRun, subjects, cfg: mmlu.MMLUConfig,
                  resume: bool = True) -> mmlu.MMLUResult:
    """Score MMLU on the run's engine with a progress bar; a rerun of the same settings resumes from
    the checkpoint, which is removed once every question is scored."""
    identity = {k: v for k, v in asdict(cfg).items() if k not in ("subjects", "limit", "batch_size")}
    checkpoint = runner.checkpoint(run, {"task": "mmlu", **identity}, resume, decode=mmlu.Scored.from_json)
    total = mmlu.count_questions(subjects, cfg.limit)
    result = mmlu.MMLUResult(cfg)
    with progress_bar(f"  {run.name} MMLU {cfg.shots}-shot {cfg.method}") as bar:
        task = bar.add_task("mmlu", total=total)

        def scored(batch):
            checkpoint.append(batch)
            bar.advance(task, len(batch))

        with runner.until_interrupted(run):
            mmlu.run_mmlu(run.backend, subjects, cfg, done=checkpoint.load(), on_scored=scored, result=result)
    end_checkpoint(run, checkpoint, len(result.scored), result.new, total, "questions", "scored")
    return result


def mmlu_record_parts(result: mmlu.MMLUResult, cfg: mmlu.MMLUConfig) -> tuple[dict, dict]:
    """(metrics, extra) of an MMLU record: the summary, per-subject accuracy and predicted letters."""
    metrics = mmlu.summarise(result, list(cfg.subjects))
    extra = {"subjects": metrics["per_subject"], "predictions": mmlu.predictions(result)}
    return metrics, extra
