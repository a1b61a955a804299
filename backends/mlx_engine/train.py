"""LoRA training on the MLX engine, with mlx-lm's tuner.

mlx-lm supplies the LoRA layers (`linear_to_lora_layers`, `LoRALinear`), the
adapter format it loads (`adapters.safetensors` + `adapter_config.json`, read
by `load_adapters` / `mlx_lm.load(adapter_path=...)`) and gradient averaging
across processes. The step loop is our own (~40 lines) rather than
`mlx_lm.tuner.train`, because that loop cannot be made to match the torch
engine's trl run: it counts micro-batches as iterations, averages per-micro-
batch mean losses under gradient accumulation (trl weights every token of the
step equally), draws its own length-sorted batch order, reports no token
accuracy, and saves no optimiser state to resume from. The loss is mlx-lm's
`default_loss` with a per-token mask in place of its (offset, length) spans.
The step is not `mx.compile`d as mlx-lm's is: batches padded to their own
length would retrace per shape, and on the CPU each compile builds C++ kernels
(tens of seconds on first use here); scripts/finetune_overhead.py measures what
that costs against mlx-lm's loop.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters, remove_lora_layers

from backends import training
from backends.types import UserError
from backends.training import Example, StepMetrics, TrainConfig, TrainResult

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def lora_keys(model, targets: tuple[str, ...]) -> list[str]:
    """Paths inside a transformer layer whose last name is a target (mlx-lm's `keys`)."""
    linears = [name for name, m in model.layers[0].named_modules()
               if isinstance(m, (nn.Linear, nn.QuantizedLinear, LoRALinear))]
    training.check_targets(targets, linears)
    return sorted(n for n in linears if n.rsplit(".", 1)[-1] in targets)


def adapter_config(cfg: TrainConfig, num_layers: int, keys: list[str], model_type: str) -> dict:
    """mlx-lm's adapter_config.json (what `load_adapters` reads), plus alpha for PEFT users."""
    return {"fine_tune_type": "lora", "num_layers": num_layers, "model_type": model_type,
            "lora_parameters": {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout, "keys": keys},
            "alpha": cfg.alpha}


def add_lora(backend, cfg: TrainConfig) -> dict:
    """Freeze the model, wrap the target layers in LoRA layers seeded like the
    torch engine's; return the adapter config."""
    model = backend.model
    model_type = backend.config.get("model_type", "?")
    targets = cfg.targets or training.default_targets(model_type)
    keys = lora_keys(model, targets)
    config = adapter_config(cfg, len(model.layers), keys, model_type)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), config["lora_parameters"])
    for n, layer in enumerate(model.layers):
        for inner, m in layer.named_modules():
            if isinstance(m, LoRALinear):
                a = training.initial_lora_a(cfg, n, inner, m.lora_a.shape[0])
                m.lora_a = mx.array(a.T).astype(m.lora_a.dtype)  # mlx-lm keeps A as [in, r]
    return config


def lora_weights(model) -> dict:
    return {k: v for k, v in tree_flatten(model.trainable_parameters())
            if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


def save_adapter(model, folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / ADAPTER_FILE), lora_weights(model))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _save_checkpoint(model, optimizer, folder: Path, config: dict, step: int, keep: int = 2) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, config)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    for _, old in training.checkpoints(folder.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(model, optimizer, folder: Path) -> int:
    model.load_weights(list(mx.load(str(folder / ADAPTER_FILE)).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    return json.loads((folder / "state.json").read_text())["step"]


def _masked_sums(model, ids, mask):
    """Summed cross-entropy over the masked targets, plus (targets, argmax hits)."""
    logits = model(ids[:, :-1]).astype(mx.float32)
    targets, m = ids[:, 1:], mask[:, 1:]
    ce = (nn.losses.cross_entropy(logits, targets) * m).sum()
    hits = ((logits.argmax(axis=-1) == targets) * m).sum()
    return ce, (m.sum(), hits)


def validation_loss(model, val: list[Example], cfg: TrainConfig, pad_id: int) -> float | None:
    if not val:
        return None
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for batch in training.val_batches(val, cfg.batch_size):
        ids, mask = training.pad_batch(batch, pad_id)
        ce, (n, _) = _masked_sums(model, mx.array(ids), mx.array(mask))
        total, count = total + ce, count + n
        mx.eval(total, count)
    model.train()
    return float(total.item() / max(count.item(), 1.0))


def _optimizer(model, cfg: TrainConfig, out_dir: Path, resume: bool):
    """AdamW on the linear schedule, and the step to go on from (the latest checkpoint's when
    resuming and there is one, else 0)."""
    optimizer = optim.AdamW(learning_rate=optim.linear_schedule(cfg.learning_rate, 0.0, cfg.steps),
                            betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, bias_correction=True)
    start = 0
    if resume and (found := training.latest_checkpoint(out_dir)):
        start = _load_checkpoint(model, optimizer, found[1])
        mx.random.seed(cfg.seed + start)  # dropout masks continue from a new stream
    return optimizer, start


def _step_gradients(model, loss_and_grad, train_set: list[Example], micro_batches, pad_id: int,
                    rank: int, world: int):
    """One optimizer step's gradients, token-weighted over all its micro-batches (and processes),
    with the summed loss and the [micro-batches, (targets, hits)] counts."""
    grads, loss_sum, per_micro = None, mx.array(0.0), []
    for micro in micro_batches:
        rows = [train_set[i] for i in micro[rank::world]]  # this process's share, as mlx-lm splits
        ids, mask = training.pad_batch(rows, pad_id)
        (ce, (n, hits)), g = loss_and_grad(model, mx.array(ids), mx.array(mask))
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss_sum = loss_sum + ce
        per_micro.append(mx.stack([n, hits]))
    counts = mx.stack(per_micro)  # [micro-batches, (targets, hits)]
    if world > 1:  # data parallel: sums over every process (average_gradients packs the all-reduce)
        loss_sum, counts = mx.distributed.all_sum(loss_sum), mx.distributed.all_sum(counts)
        grads = tree_map(lambda g: g * world, average_gradients(grads))
    total = counts[:, 0].sum()
    grads = tree_map(lambda g: g / total, grads)  # token-weighted mean over the whole step
    return grads, loss_sum, counts


def _step_metrics(backend, cfg: TrainConfig, step: int, tokens: int, loss_sum, counts, took: float,
                  began: float, val: float | None) -> StepMetrics:
    c = np.array(counts)
    return StepMetrics(
        step=step, total_steps=cfg.steps, loss=float(loss_sum.item() / c[:, 0].sum()),
        token_accuracy=float(np.mean(c[:, 1] / np.maximum(c[:, 0], 1))),
        learning_rate=training.linear_lr(cfg, step - 1), tokens=tokens, tokens_per_s=tokens / took,
        step_time_s=took, elapsed_s=time.perf_counter() - began,
        peak_memory_bytes=backend.memory().peak_bytes, val_loss=val)


def train(backend, train_set: list[Example], val_set: list[Example], cfg: TrainConfig, out_dir: Path,
          on_step: training.OnStep | None = None, resume: bool = False) -> TrainResult:
    out_dir = Path(out_dir)
    group = mx.distributed.init()
    world, rank = group.size(), group.rank()
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} processes")
    mx.random.seed(cfg.seed)
    model = backend.model
    config = add_lora(backend, cfg)
    optimizer, start = _optimizer(model, cfg, out_dir, resume)
    plan = training.plan_steps(len(train_set), cfg)
    pad_id = backend.tokenizer.pad_token_id if backend.tokenizer.pad_token_id is not None else 0
    loss_and_grad = nn.value_and_grad(model, _masked_sums)
    result = TrainResult("mlx", str(out_dir), start, cfg.steps, start,
                         sum(v.size for v in lora_weights(model).values()),
                         memory_source=backend.memory().source, processes=world)
    model.train()
    backend.reset_peak_memory()
    if not start:  # a resumed run's starting point is in the first run's record
        result.initial_val_loss = validation_loss(model, val_set, cfg, pad_id)
    began = time.perf_counter()
    try:
        for step in range(start + 1, cfg.steps + 1):
            tic = time.perf_counter()
            grads, loss_sum, counts = _step_gradients(model, loss_and_grad, train_set, plan[step - 1], pad_id,
                                                      rank, world)
            if cfg.max_grad_norm > 0:
                grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss_sum, counts)
            took = time.perf_counter() - tic
            result.wall_s += took
            result.steps_done = step
            val = None
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = validation_loss(model, val_set, cfg, pad_id)
            tokens = training.step_tokens(plan[step - 1], train_set)
            metrics = _step_metrics(backend, cfg, step, tokens, loss_sum, counts, took, began, val)
            result.history.append(metrics)
            if on_step:
                on_step(metrics)
            if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps):
                _save_checkpoint(model, optimizer, out_dir / f"checkpoint-{step}", config, step)
    except KeyboardInterrupt:
        result.interrupted = True
        done = result.steps_done
        if rank == 0 and done > start and not (out_dir / f"checkpoint-{done}").exists():
            _save_checkpoint(model, optimizer, out_dir / f"checkpoint-{done}", config, done)
    model.eval()
    if rank == 0:
        save_adapter(model, out_dir, config)
    return result


def apply_adapter(backend, adapter_dir: Path) -> None:
    """Load an mlx-lm adapter folder onto the model (replacing any adapter it has)."""
    remove_adapter(backend)
    load_adapters(backend.model, str(adapter_dir))
    backend.model.eval()


def remove_adapter(backend) -> None:
    remove_lora_layers(backend.model)
