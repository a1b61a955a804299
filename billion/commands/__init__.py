"""One module per CLI command, plus the options and helpers they share.

Command modules import mlx/torch-facing code only inside the command body, so
`billion --help` stays fast and works with an engine missing.
"""

from __future__ import annotations

import gc
import os
import sys
from contextlib import contextmanager, nullcontext

import click
from rich.console import Console

# Piped output (logs, CI) gets 120 columns rather than rich's 80, so tables are not cut.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)

# int8/int4 on both engines; bnb-* are bitsandbytes on CUDA (torch only).
QUANTIZE_CHOICES = ["int8", "int4", "bnb-int8", "bnb-int4"]


def model_options(f):
    """--model/--backend/--device/--dtype/--quantize/--trust-remote-code, with env-var defaults."""
    options = [
        click.option("--model", "-m", envvar="BILLION_MODEL", default="random:tinyllama", show_default=True,
                     help="Alias, Hub id, local HF folder, random:<alias> or tiny:<alias> [env BILLION_MODEL]."),
        click.option("--backend", "-b", envvar="BILLION_BACKEND", default="auto", show_default=True,
                     help="mlx, torch, auto (mlx on Apple Silicon, else torch), all, or a comma list "
                          "[env BILLION_BACKEND]."),
        click.option("--device", default=None,
                     help="MLX: gpu|cpu; torch: cuda|mps|cpu. Default: the best available."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Default: float32 on CPU, bfloat16 on CUDA and MLX GPU, float16 on MPS."),
        click.option("--quantize", "-q", type=click.Choice(QUANTIZE_CHOICES), default=None,
                     help="Weight-only quantization at load time."),
        click.option("--group-size", type=int, default=64, show_default=True, help="Quantization group size."),
        click.option("--trust-remote-code", is_flag=True, help="Allow model folders to run their own code."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def results_option(f):
    return click.option("--results-dir", envvar="BILLION_RESULTS", default="results", show_default=True,
                        type=click.Path(file_okay=False), help="Where JSON records go [env BILLION_RESULTS].")(f)


def load_kwargs(opts: dict) -> dict:
    return {k: opts[k] for k in ("device", "dtype", "trust_remote_code", "quantize", "group_size")}


def engines(choice: str) -> list[str]:
    import backends

    return backends.resolve(choice)


@contextmanager
def loaded(engine: str, model: str, **kwargs):
    """Load a model on one engine, with a status line, and free it afterwards."""
    from billion.loading import load

    with console.status(f"loading {model} on {engine}..."):
        backend = load(engine, model, **kwargs)
    try:
        yield backend
    finally:
        backend.close()
        del backend
        gc.collect()


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


def cpu_threads_note() -> str:
    return f"{os.cpu_count()} CPU cores"
