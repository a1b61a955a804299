"""LoRA training on the torch engine: peft's LoRA layers, trl's SFTTrainer.

trl gets the examples already tokenized, with `labels` (-100 outside the loss
mask), so it neither templates nor re-tokenizes them, in the plan's order
(`train_sampling_strategy="sequential"` over the flattened plan, one pass), so
its batches are those of the MLX engine. Checkpoints, resuming and data
parallelism (torchrun / accelerate launch) are the Trainer's own.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from backends import training
from backends.types import UserError
from backends.training import Example, StepMetrics, TrainConfig, TrainResult


def add_lora(backend, cfg: TrainConfig) -> PeftModel:
    if backend.quantization:  # QLoRA: gradients must flow through the frozen quantized base
        from backends.torch_engine.quant_adapters import prepare_for_training

        note = prepare_for_training(backend.model)
        backend.quantization += f"; {note}" if note else ""
    model_type = backend.model.config.model_type
    targets = list(cfg.targets or training.default_targets(model_type))
    # the transformer layers' linear layers (quantized ones included: they subclass nn.Linear or keep it)
    training.check_targets(targets, [n for n, m in backend.model.named_modules()
                                     if isinstance(m, torch.nn.Linear) and training.in_layer(n)])
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(backend.model, config)
    except ValueError as e:  # peft names the missing target modules
        raise UserError(f"cannot put LoRA on {', '.join(targets)}: {str(e).splitlines()[0]}") from None
    with torch.no_grad():
        for name, m in peft_model.named_modules():
            if isinstance(m, LoraLayer) and "default" in m.lora_A:
                layer, inner = training.layer_key(name)
                a = m.lora_A["default"].weight
                a.copy_(torch.from_numpy(training.initial_lora_a(cfg, layer, inner, a.shape[1])).to(a.dtype))
    return peft_model


def _dataset(examples: list[Example]) -> Dataset:
    return Dataset.from_dict({
        "input_ids": [list(e.ids) for e in examples],
        "labels": [[t if m else -100 for t, m in zip(e.ids, e.mask)] for e in examples]})


@torch.no_grad()
def validation_loss(model, val: list[Example], cfg: TrainConfig, pad_id: int, device) -> float | None:
    if not val:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for batch in training.val_batches(val, cfg.batch_size):
        ids, mask = training.pad_batch(batch, pad_id)
        ids, mask = torch.from_numpy(ids).long().to(device), torch.from_numpy(mask).to(device)
        attention = torch.zeros_like(ids)
        for row, e in enumerate(batch):
            attention[row, :len(e.ids)] = 1
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        total += float((ce * mask[:, 1:]).sum())
        count += float(mask[:, 1:].sum())
    model.train(was_training)
    return total / max(count, 1.0)


class _Metrics(TrainerCallback):
    """Turns the Trainer's per-step logs into StepMetrics, adding validation loss and timing."""

    def __init__(self, backend, model, plan, train_set, val_set, cfg, result, on_step, pad_id):
        self.backend, self.model, self.plan, self.train_set = backend, model, plan, train_set
        self.val_set, self.cfg, self.result, self.on_step, self.pad_id = val_set, cfg, result, on_step, pad_id
        self.began = time.perf_counter()
        self.tic = self.took = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self.tic = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.took = time.perf_counter() - self.tic

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        step = state.global_step
        val = None
        if step % self.cfg.eval_every == 0 or step == self.cfg.steps:
            val = validation_loss(self.model, self.val_set, self.cfg, self.pad_id, self.backend.device)
        tokens = training.step_tokens(self.plan[step - 1], self.train_set)
        metrics = StepMetrics(
            step=step, total_steps=self.cfg.steps, loss=float(logs["loss"]),
            token_accuracy=float(logs.get("mean_token_accuracy", float("nan"))),
            learning_rate=training.linear_lr(self.cfg, step - 1), tokens=tokens,
            tokens_per_s=tokens / self.took if self.took else 0.0, step_time_s=self.took,
            elapsed_s=time.perf_counter() - self.began, peak_memory_bytes=self.backend.memory().peak_bytes,
            val_loss=val)
        self.result.history.append(metrics)
        self.result.steps_done = step
        self.result.wall_s += self.took
        if self.on_step:
            self.on_step(metrics)


def train(backend, *args, **kwargs) -> TrainResult:
    with warnings.catch_warnings():  # transformers' v6 renames of arguments trl passes: not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return _train(backend, *args, **kwargs)


def _train(backend, train_set: list[Example], val_set: list[Example], cfg: TrainConfig, out_dir: Path,
          on_step: training.OnStep | None = None, resume: bool = False) -> TrainResult:
    out_dir = Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} processes")
    torch.manual_seed(cfg.seed)
    peft_model = add_lora(backend, cfg)
    plan = training.plan_steps(len(train_set), cfg)
    ordered = [train_set[i] for step in plan for micro in step for i in micro]
    pad_id = backend.tokenizer.pad_token_id if backend.tokenizer.pad_token_id is not None else 0
    cpu = backend.device == "cpu"
    args = SFTConfig(
        output_dir=str(out_dir), max_steps=cfg.steps, num_train_epochs=1,
        per_device_train_batch_size=cfg.batch_size // world, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed, data_seed=cfg.seed, train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_every, save_total_limit=2,
        eval_strategy="no", report_to="none", disable_tqdm=True, gradient_checkpointing=False,
        bf16=False, fp16=False, use_cpu=cpu, max_length=None, pad_to_multiple_of=None,
        dataloader_num_workers=0, ddp_backend="gloo" if (cpu and world > 1) else None,
        ddp_find_unused_parameters=False if world > 1 else None)
    result = TrainResult("torch", str(out_dir), 0, cfg.steps, 0,
                         sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
                         memory_source=backend.memory().source, processes=world)
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=_dataset(ordered),
                         processing_class=backend.tokenizer)
    for printer in (PrinterCallback, ProgressCallback):  # billion streams its own progress
        trainer.remove_callback(printer)
    trainer.add_callback(_Metrics(backend, peft_model, plan, train_set, val_set, cfg, result, on_step, pad_id))
    checkpoint = last_complete_checkpoint(out_dir) if resume else None
    if checkpoint:
        result.start_step = result.steps_done = checkpoint[0]
    backend.reset_peak_memory()
    if not checkpoint:  # a resumed run's starting point is in the first run's record
        result.initial_val_loss = validation_loss(peft_model, val_set, cfg, pad_id, backend.device)
    try:
        if not checkpoint or checkpoint[0] < cfg.steps:
            trainer.train(resume_from_checkpoint=str(checkpoint[1]) if checkpoint else None)
    except KeyboardInterrupt:
        result.interrupted = True
        step = trainer.state.global_step
        if trainer.is_world_process_zero() and step > result.start_step and not (out_dir / f"checkpoint-{step}").exists():
            trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer saves nothing on Ctrl-C itself
    peft_model.eval()
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(str(out_dir))  # adapter_model.safetensors + adapter_config.json: LoRA only
    return result


# what a Trainer checkpoint of a LoRA run holds; trainer_state.json is written last
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "trainer_state.json")


def _incomplete(folder: Path, step: int) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a file missing or cut short), or None."""
    import json
    import zipfile

    from backends.folders import adapters

    missing = [n for n in CHECKPOINT_FILES if not (folder / n).is_file()]
    if missing:
        return f"no {missing[0]}"
    try:
        state = json.loads((folder / "trainer_state.json").read_bytes())
        json.loads((folder / "adapter_config.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return "a JSON file is damaged"
    if not isinstance(state, dict) or state.get("global_step") != step:
        return f"trainer_state.json is not at step {step}"
    for name in ("optimizer.pt", "scheduler.pt"):  # torch.save writes zip files: a cut one has no directory
        try:
            with zipfile.ZipFile(folder / name):
                pass
        except (OSError, zipfile.BadZipFile):
            return f"{name} is cut short"
    weights = folder / "adapter_model.safetensors"
    try:
        header, start = adapters._header(weights)
    except (OSError, UserError):
        return "adapter_model.safetensors is damaged"
    end = max((m["data_offsets"][1] for k, m in header.items() if k != "__metadata__"), default=0)
    if weights.stat().st_size < start + end:
        return "adapter_model.safetensors is cut short"
    return None


def last_complete_checkpoint(out_dir: Path) -> tuple[int, Path] | None:
    """The newest `checkpoint-<step>` folder with every file whole; newer, incomplete ones
    (a save cut off part way) are skipped with a warning."""
    import logging

    for step, folder in reversed(training.checkpoints(out_dir)):
        why = _incomplete(folder, step)
        if why is None:
            return step, folder
        logging.getLogger("billion").warning("skipping %s: incomplete checkpoint (%s)", folder, why)
    return None


def apply_adapter(backend, adapter_dir: Path) -> None:
    """Load a PEFT adapter folder onto the model (replacing any adapter it has)."""
    remove_adapter(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' v6 renames inside peft
        PeftModel.from_pretrained(backend.model, str(adapter_dir)).eval()


def remove_adapter(backend) -> None:
    """Put each LoRA-wrapped layer's base layer back."""
    model = backend.model
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
