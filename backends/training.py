"""LoRA training, the engine-free part: config, examples, batch plan, metrics.

Both engines train from the same `Example`s (token ids and a loss mask made
once by billion/tasks/finetune_data.py), in the same order (`plan_steps`), with the same
initial LoRA A matrices (`initial_lora_a`), the same optimiser (AdamW without
weight decay, bias-corrected, linear decay to zero, gradient-norm clipping)
and the same loss (cross-entropy summed over every masked token of an
optimiser step, divided by their number: the token-weighted mean trl and
transformers use under gradient accumulation). Each engine's loop lives in
backends/<engine>_engine/train.py; nothing here imports mlx or torch.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from backends.types import UserError

# Default LoRA targets per architecture (model_type): the seed's q_proj/v_proj
# attention projections where they exist; GPT-NeoX fuses them into one layer.
DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"),
    "stablelm": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
}


def default_targets(model_type: str) -> tuple[str, ...]:
    if model_type not in DEFAULT_TARGETS:
        raise UserError(f"no default LoRA targets for architecture {model_type!r}; name the layers with --targets "
                        f"(known: {', '.join(DEFAULT_TARGETS)})")
    return DEFAULT_TARGETS[model_type]


def check_targets(targets, linear_names) -> None:
    """Every target must name a linear layer of the model (no silent no-op adapters)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    unknown = [t for t in targets if t not in leaves]
    if unknown:
        raise UserError(f"no linear layer named {', '.join(unknown)} in this model; its linear layers are: "
                        f"{', '.join(leaves)}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters both engines read. Defaults: the seed's demo (peft + trl)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ()  # layer names (last path component); () = the architecture's default
    steps: int = 1  # optimiser steps (billion turns --epochs into steps)
    batch_size: int = 4
    grad_accum: int = 4
    learning_rate: float = 2e-4
    max_grad_norm: float = 1.0  # transformers' default; 0 disables clipping
    max_seq_len: int = 512
    seed: int = 0
    eval_every: int = 10  # validation loss every N steps (and before the first, after the last)
    save_every: int = 25  # checkpoint every N steps (and on Ctrl-C, and at the end)

    @property
    def scale(self) -> float:
        """LoRA's output multiplier: PEFT's alpha / r, mlx-lm's `scale`."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class Example:
    """One training sequence: ids, and mask[i] == 1 where token i is a target
    (predicted from ids[:i] and counted in the loss); mask[0] is always 0."""

    ids: tuple[int, ...]
    mask: tuple[int, ...]

    @property
    def targets(self) -> int:
        return sum(self.mask)


@dataclass(frozen=True)
class StepMetrics:
    step: int
    total_steps: int
    loss: float  # token-weighted mean over the step's masked tokens
    token_accuracy: float  # trl's mean_token_accuracy: argmax hits per micro-batch, averaged over micro-batches
    learning_rate: float  # the rate this step's update used
    tokens: int  # non-padding tokens in the step
    tokens_per_s: float
    step_time_s: float
    elapsed_s: float
    peak_memory_bytes: int | None
    val_loss: float | None = None  # when validation ran after this step


@dataclass
class TrainResult:
    engine: str
    adapter_dir: str
    steps_done: int
    total_steps: int
    start_step: int  # > 0 when resumed from a checkpoint
    trainable_parameters: int
    history: list[StepMetrics] = field(default_factory=list)
    initial_val_loss: float | None = None
    wall_s: float = 0.0  # training loop only (validation excluded)
    memory_source: str = ""
    interrupted: bool = False
    processes: int = 1  # data-parallel processes (torchrun / mlx.launch); tokens/s counts all of them

    @property
    def train_tokens_per_s(self) -> float | None:
        tokens = sum(m.tokens for m in self.history)
        spent = sum(m.step_time_s for m in self.history)
        return tokens / spent if spent else None

    @property
    def peak_memory_bytes(self) -> int | None:
        peaks = [m.peak_memory_bytes for m in self.history if m.peak_memory_bytes is not None]
        return max(peaks) if peaks else None

    @property
    def final_val_loss(self) -> float | None:
        vals = [m.val_loss for m in self.history if m.val_loss is not None]
        return vals[-1] if vals else None


OnStep = Callable[[StepMetrics], None]


# ---------------------------------------------------------------- batch order


def steps_for_epochs(n_train: int, batch_size: int, grad_accum: int, epochs: float) -> int:
    """Optimiser steps in `epochs` passes: micro-batches flow across epoch ends."""
    check_enough(n_train, batch_size)
    return max(1, int(epochs * (n_train // batch_size)) // grad_accum)


def check_enough(n_train: int, batch_size: int) -> None:
    if n_train < batch_size:
        raise UserError(f"{n_train} training examples are fewer than one batch of {batch_size}; "
                        f"add data or lower --batch-size")


def plan_steps(n_train: int, cfg: TrainConfig) -> list[list[list[int]]]:
    """Example indices per micro-batch per optimiser step, for every step.

    Each epoch is a fresh permutation (seeded by seed + epoch); its last
    incomplete micro-batch is dropped (as mlx-lm does), so every micro-batch
    has batch_size examples and both engines see identical batches.
    """
    check_enough(n_train, cfg.batch_size)
    need = cfg.steps * cfg.grad_accum
    micro: list[list[int]] = []
    epoch = 0
    while len(micro) < need:
        order = np.random.default_rng(cfg.seed + epoch).permutation(n_train).tolist()
        for i in range(0, n_train - cfg.batch_size + 1, cfg.batch_size):
            micro.append(order[i:i + cfg.batch_size])
        epoch += 1
    micro = micro[:need]
    return [micro[s * cfg.grad_accum:(s + 1) * cfg.grad_accum] for s in range(cfg.steps)]


def pad_batch(examples: Sequence[Example], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 ids and float32 mask, [batch, longest]."""
    longest = max(len(e.ids) for e in examples)
    ids = np.full((len(examples), longest), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), longest), dtype=np.float32)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = e.ids
        mask[row, :len(e.mask)] = e.mask
    return ids, mask


def step_tokens(step: list[list[int]], examples: Sequence[Example]) -> int:
    return sum(len(examples[i].ids) for batch in step for i in batch)


def val_batches(val: Sequence[Example], batch_size: int) -> list[list[Example]]:
    return [list(val[i:i + batch_size]) for i in range(0, len(val), batch_size)]


def linear_lr(cfg: TrainConfig, step_index: int) -> float:
    """The rate of update number `step_index` (0-based): transformers' "linear" schedule, no warm-up."""
    return cfg.learning_rate * max(0.0, (cfg.steps - step_index) / cfg.steps)


# ---------------------------------------------------------------- LoRA layers


_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.+)$")


def layer_key(module_path: str) -> tuple[int, str]:
    """(layer index, path inside the layer) of a module path in either engine:
    'model.layers.3.self_attn.q_proj', 'model.h.3.attention.query_key_value',
    'base_model.model.gpt_neox.layers.3.attention.query_key_value'."""
    m = _LAYER.search(module_path)
    if not m:
        raise ValueError(f"not inside a transformer layer: {module_path}")
    return int(m.group(1)), m.group(2)


def in_layer(module_path: str) -> bool:
    return bool(_LAYER.search(module_path))


def initial_lora_a(cfg: TrainConfig, layer: int, inner: str, in_dims: int) -> np.ndarray:
    """Seeded A matrix [r, in] (PEFT's layout) for one adapted layer.

    Uniform(-1/sqrt(in), 1/sqrt(in)): the distribution of both mlx-lm's init and
    PEFT's kaiming_uniform(a=sqrt(5)); drawn here so both engines start equal.
    """
    rng = np.random.default_rng([cfg.seed, layer, zlib.crc32(inner.encode())])
    bound = 1.0 / math.sqrt(in_dims)
    return rng.uniform(-bound, bound, size=(cfg.rank, in_dims)).astype(np.float32)


# ---------------------------------------------------------------- checkpoints


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-<step>` folder, oldest first."""
    found = []
    for p in Path(out_dir).glob("checkpoint-*"):
        if p.is_dir() and p.name.split("-", 1)[1].isdigit():
            found.append((int(p.name.split("-", 1)[1]), p))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> tuple[int, Path] | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None
