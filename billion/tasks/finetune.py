"""LoRA fine-tuning on either engine from the same data and config.

The data is tokenized once (billion/tasks/finetune_data.py) and every engine trains on those
examples in the same order (backends/training.py), so their step losses can
be compared. Each engine writes its adapter in its own format under
<out>/<engine>/ (mlx-lm: adapters.safetensors; PEFT: adapter_model.safetensors),
with checkpoints to resume from beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from backends.types import GenerationConfig, UserError
from backends.training import StepMetrics, TrainConfig, TrainResult, default_targets, steps_for_epochs
from billion.tasks import finetune_data as data

DEFAULT_PROMPTS = ("What is the capital of France?", "Give the opposite of 'hot'.",
                   "Explain what a prime number is in one sentence.")


@dataclass(frozen=True)
class FinetuneConfig:
    data: str = "sample"
    epochs: float = 3.0
    steps: int | None = None  # overrides epochs
    val_split: float = 0.1
    chat: bool | None = None  # instruction rows through the chat template (None: when the model has one)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    answer_tokens: int = 32
    out_dir: str = "adapters"
    resume: bool = False
    fuse: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Prepared:
    """The tokenized data every engine trains on."""

    train: list
    val: list
    dropped: int
    chat: bool
    fingerprint: str
    train_config: TrainConfig  # with steps resolved


@dataclass
class FinetuneRun:
    engine: str
    result: TrainResult
    before: list[str]
    after: list[str]
    adapter_dir: Path
    fused_dir: Path | None = None


def is_main_process() -> bool:
    """False on the other ranks of torchrun / accelerate launch / mlx.launch (they print and record nothing)."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "MLX_RANK"))


def prepare(backend, cfg: FinetuneConfig) -> Prepared:
    chat = data.use_chat(backend, cfg.chat)
    rows = data.read_rows(cfg.data)
    examples, dropped = data.encode(backend, rows, cfg.train.max_seq_len, chat)
    val_rows = data.read_validation_rows(cfg.data)
    if val_rows is not None:  # a folder's valid.jsonl replaces the split
        train = examples
        val, _ = data.encode(backend, val_rows, cfg.train.max_seq_len, chat)
        examples = train + val
    else:
        train, val = data.split(examples, cfg.val_split, cfg.train.seed)
    t = cfg.train
    steps = cfg.steps or steps_for_epochs(len(train), t.batch_size, t.grad_accum, cfg.epochs)
    targets = t.targets or default_targets(backend.info().model_type)  # resolved here, so records name them
    return Prepared(train, val, dropped, chat, data.fingerprint(examples), replace(t, steps=steps, targets=targets))


def engine_dir(cfg: FinetuneConfig, engine: str) -> Path:
    return Path(cfg.out_dir) / engine


def _check_resume(folder: Path, identity: dict, resume: bool) -> None:
    """Resuming needs the same model, data and settings; a fresh run needs an empty folder."""
    marker = folder / "finetune.json"
    if not is_main_process():  # the first process checks and writes; the others follow it
        folder.mkdir(parents=True, exist_ok=True)
        return
    if resume and marker.is_file():
        try:
            before = json.loads(marker.read_bytes())
        except (ValueError, RecursionError):
            before = None
        if not isinstance(before, dict):
            raise UserError(f"{marker}: damaged (not a JSON object), so this run cannot be checked as the same; "
                            f"use another --out or drop --resume")
        changed = [k for k in identity if k != "train" and before.get(k) != identity[k]]
        changed += ["--lr" if k == "learning_rate" else f"--{k.replace('_', '-')}" for k, v in identity["train"].items()
                    if before.get("train", {}).get(k) != v]
        if changed:
            raise UserError(f"cannot resume in {folder}: {', '.join(changed)} changed since the checkpoint; "
                            f"use another --out or drop --resume")
        return
    if not resume and folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} already holds a fine-tune; pass --resume to continue it or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.tmp")  # atomic: a crash leaves the old marker or the new, never half
    try:
        tmp.write_text(json.dumps(identity, indent=2))
        os.replace(tmp, marker)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def answers(backend, prompts, chat: bool, max_tokens: int) -> list[str]:
    gen = GenerationConfig(max_tokens=max_tokens, temperature=0.0)
    return [backend.detokenize(backend.generate(data.prompt_ids(backend, p, chat), gen)).strip() for p in prompts]


def run(backend, model_spec: str, cfg: FinetuneConfig, prepared: Prepared, on_step=None, on_phase=None) -> FinetuneRun:
    """Answers before, train, answers after, optionally fuse, on one loaded engine."""
    engine = backend.name
    folder = engine_dir(cfg, engine)
    tcfg = prepared.train_config
    # what the checkpoint's training depends on (how often to validate or save does not matter), as JSON reads it back
    train = {k: v for k, v in asdict(tcfg).items() if k not in ("eval_every", "save_every")}
    identity = json.loads(json.dumps({"model": model_spec, "data": prepared.fingerprint, "train": train,
                                      "chat": prepared.chat}))
    _check_resume(folder, identity, cfg.resume)
    phase = on_phase or (lambda text: None)
    main = is_main_process()
    before = []
    if main and cfg.prompts:
        phase("answers before training")
        before = answers(backend, cfg.prompts, prepared.chat, cfg.answer_tokens)
    phase("training")
    result = backend.lora_train(prepared.train, prepared.val, tcfg, folder, on_step=on_step, resume=cfg.resume)
    after = []
    if main and cfg.prompts and not result.interrupted:
        phase("answers after training")
        after = answers(backend, cfg.prompts, prepared.chat, cfg.answer_tokens)
    fused = None
    if main and cfg.fuse and not result.interrupted and backend.quantization:
        from billion.tasks.quantized_fuse import fuse_quantized

        phase("fusing into the quantized base (dequantize, fuse, re-quantize, check)")
        fused = folder.parent / f"{folder.name}-fused"
        fuse_quantized(backend, fused)
    elif main and cfg.fuse and not result.interrupted:
        from backends.folders.adapters import fuse

        phase("fusing")
        fused = fuse(backend.path, folder, folder.parent / f"{folder.name}-fused")
    return FinetuneRun(engine, result, before, after, folder, fused)


def metrics(run: FinetuneRun) -> dict:
    r = run.result
    last: StepMetrics | None = r.history[-1] if r.history else None
    peak = r.peak_memory_bytes
    return {
        "steps_done": r.steps_done, "total_steps": r.total_steps, "start_step": r.start_step,
        "train_loss_first": r.history[0].loss if r.history else None,
        "train_loss_final": last.loss if last else None,
        "val_loss_initial": r.initial_val_loss, "val_loss_final": r.final_val_loss,
        "token_accuracy_final": last.token_accuracy if last else None,
        "train_tokens_per_s": r.train_tokens_per_s, "train_time_s": r.wall_s,
        "trainable_parameters": r.trainable_parameters, "processes": r.processes,
        "peak_memory_gb": peak / 1e9 if peak is not None else None, "memory_source": r.memory_source,
    }


def record_extra(run: FinetuneRun, prepared: Prepared, cfg: FinetuneConfig) -> dict:
    return {
        "history": [asdict(m) for m in run.result.history],
        "answers": [{"prompt": p, "before": b, "after": a}
                    for p, b, a in zip(cfg.prompts, run.before, run.after or [""] * len(run.before))],
        "adapter_dir": str(run.adapter_dir), "fused_dir": str(run.fused_dir) if run.fused_dir else None,
        "data": {"source": cfg.data, "train_examples": len(prepared.train), "val_examples": len(prepared.val),
                 "dropped": prepared.dropped, "chat_template": prepared.chat, "fingerprint": prepared.fingerprint},
    }


def config_dict(cfg: FinetuneConfig, prepared: Prepared) -> dict:
    d = asdict(cfg)
    d["train"] = asdict(prepared.train_config)
    d["prompts"] = list(cfg.prompts)
    return d
