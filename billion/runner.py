"""The one load -> run -> record loop that every command uses.

A command resolves its model once (billion.loading.resolve), builds a Runner with the task's
name, its config dataclass and the load options, and walks the requested engines:

    with Runner("perplexity", model, load, cfg, results_dir) as runner:
        for run in runner.engines(names):
            result = task.PerplexityResult()
            with runner.until_interrupted(run):
                task.measure(run.backend, text, cfg, result=result)
            runner.record(run, result.metrics())
        print_table(...)

The runner owns what every command used to write for itself: loading each engine in turn with a
status line and closing it after, the engine line on screen, start times, the record (config from
the task's dataclass plus the load options; status from the run), agreement records between
engines, checkpoints keyed by a hash of the run's identity, and the one Ctrl-C policy: Ctrl-C
during a run ends that run, what it had done is recorded as `interrupted`, no further engine
starts, the command prints what it has, and it exits with status 130.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Callable, Iterator

import click

from backends.base import Backend
from backends.speculation import NgramDraft
from backends.types import ModelInfo
from billion.loading import LoadOptions, ResolvedModel
from billion.loading import load as load_backend
from billion.records.checkpoint import Checkpoint
from billion.records.store import make_record, write_record
from billion.ui import console, print_engine


@dataclass
class EngineRun:
    """One engine's turn in a command: the loaded backend, what it is, when it started, and whether
    Ctrl-C cut it short."""

    name: str
    backend: Backend | None  # None where the run loads several models itself (quality's precisions)
    info: ModelInfo | None
    started: float
    interrupted: bool = False

    @property
    def status(self) -> str:
        return "interrupted" if self.interrupted else "complete"


def config_of(cfg) -> dict:
    """A task's config dataclass (or a plain dict) as records store it."""
    if cfg is None:
        return {}
    return asdict(cfg) if is_dataclass(cfg) else dict(cfg)


class Runner:
    """One command's run over one or more engines; a context manager that exits with status 130
    after the command has printed what it had, if a run was interrupted."""

    def __init__(self, task: str, model: ResolvedModel, options: LoadOptions, config=None,
                 results_dir: str | Path = "results"):
        self.task, self.model, self.options, self.config = task, model, options, config
        self.results_dir = Path(results_dir)
        self.interrupted = False
        self.out = console  # where the record lines go (chat --json moves them to stderr)

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None and self.interrupted:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(130)

    # ------------------------------------------------------------ loading

    def load(self, engine: str, model: ResolvedModel | None = None, options: LoadOptions | None = None,
             label: str | None = None) -> Backend:
        """`model` (default: the command's) loaded on `engine` with a status line; the caller closes it."""
        model = model or self.model
        options, note = (options or self.options).for_engine(engine)
        if note:
            console.print(f"[dim]{note}[/]")
        with console.status(f"loading {label or model} on {engine}..."):
            return load_backend(engine, model, options)

    @contextmanager
    def loaded(self, engine: str, model: ResolvedModel | None = None, options: LoadOptions | None = None,
               label: str | None = None) -> Iterator[Backend]:
        """As load(), and closed (its memory freed) when the block ends."""
        backend = self.load(engine, model, options, label)
        try:
            yield backend
        finally:
            backend.close()
            del backend
            gc.collect()

    def draft(self, engine: str, pair, options: LoadOptions | None = None):
        """What Backend.stream takes as a draft on `engine` (a context manager): the pair's draft
        model loaded, its NgramDraft as it is (prompt lookup has no model), or None without a pair."""
        if pair is None or isinstance(pair.draft, NgramDraft):
            return nullcontext(pair.draft if pair else None)
        return self.loaded(engine, model=pair.draft, options=options, label=pair.draft_label)

    def engines(self, names: list[str], *, parameters: bool = False, options: LoadOptions | None = None,
                label: str | None = None) -> Iterator[EngineRun]:
        """Each engine in turn, loaded, its line printed; none starts after an interrupted run."""
        for name in names:
            with self.loaded(name, options=options, label=label) as backend:
                run = EngineRun(name, backend, backend.info(), time.time())
                print_engine(label or name, run.info, parameters=parameters)
                yield run
            if run.interrupted:
                return

    # ------------------------------------------------------------ Ctrl-C

    @contextmanager
    def until_interrupted(self, run: EngineRun | None = None):
        """The one Ctrl-C policy: the run ends, what it did is kept (the task filled its result as it
        went) and recorded as interrupted, and no further run starts."""
        try:
            yield
        except KeyboardInterrupt:
            self.interrupted = True
            if run is not None:
                run.interrupted = True

    def stop(self, run: EngineRun) -> None:
        """A run the engine ended itself at Ctrl-C (a trainer keeping its last checkpoint): recorded
        and ended as if until_interrupted had caught it."""
        run.interrupted = self.interrupted = True

    # ------------------------------------------------------------ records

    def record(self, run: EngineRun, metrics: dict, *, config: dict | None = None, extra: dict | None = None,
               backend: str | None = None, info: ModelInfo | None = None, task: str | None = None,
               settings=None) -> dict:
        """Write the run's record: the task's config (or `settings`, another task's config, for a
        task run inside this one, e.g. bench --mmlu) and the load options, plus `config`; the
        metrics, the engine's model info and `extra`; its path on screen."""
        base = config_of(settings if settings is not None else self.config)
        full_config = {**base, **self.options.record(), **(config or {})}
        record = make_record(task or self.task, backend or run.name, str(self.model), full_config, metrics,
                             started=run.started, status=run.status, source=self.model.source,
                             extra={**_model_info(info or run.info), **(extra or {})})
        self.out.print(f"  record: {write_record(record, self.results_dir)}", soft_wrap=True, markup=False)
        return record

    def agreement(self, first: str, other: str, agree: dict, config: dict | None = None,
                  task: str | None = None) -> None:
        """The `<task>_agreement` record of two engines (what a several-engine run compares), or a
        record of the comparison's own `task` (bench's `parity`)."""
        record = make_record(task or f"{self.task}_agreement", f"{first},{other}", str(self.model),
                             {**config_of(self.config), **(config or {})}, agree, started=time.time(),
                             source=self.model.source)
        console.print(f"  record: {write_record(record, self.results_dir)}")

    # ------------------------------------------------------------ resume

    def checkpoint(self, run: EngineRun, identity: dict, resume: bool = True,
                   decode: Callable[[dict], object] = dict) -> Checkpoint:
        """The run's checkpoint: keyed by a hash of everything that changes the answers (the model's
        content, the engine, the load options, the device used and `identity`, the parts of the
        task's config that matter); emptied first unless `resume`."""
        key = {"model": self.model.digest, "backend": run.name, **self.options.record(), "device_used": run.info.device,
               **identity}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        checkpoint = Checkpoint(self.results_dir / ".partial" / f"{self.task}-{digest}.jsonl", decode)
        if not resume:
            checkpoint.remove()
        return checkpoint


def end_checkpoint(run: EngineRun, checkpoint: Checkpoint, done: int, new: int, total: int, noun: str,
                   verb: str) -> None:
    """After a resumable run: say what came from the checkpoint, and either how far an interrupted
    run got (its checkpoint stays for the rerun) or remove the checkpoint of a complete one."""
    if done - new:
        console.print(f"  resumed {done - new} {noun} already {verb} ({checkpoint.path})")
    if run.interrupted:
        console.print(f"  interrupted: {done}/{total} {verb}; rerun the same command to resume")
    else:
        checkpoint.remove()


def _model_info(info: ModelInfo | None) -> dict:
    return {"model_info": info.__dict__} if info else {}


def versus_first(done: dict):
    """(first engine, its result, other engine, its result) for each engine after the first: what
    the agreement of a several-engine run compares."""
    (first, a), *rest = done.items()
    for other, b in rest:
        yield first, a, other, b
