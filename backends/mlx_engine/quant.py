"""MLX weight quantization: mlx-lm's affine scheme (what `mlx_lm.convert -q` does).

Every layer with a quantized form (Linear, Embedding; a tied output head goes
with its embedding) whose input width divides by the group size is packed to
`bits` per weight in uint32 words, with one float scale and one float bias per
group. The packed weights are what decode reads, so `info()` counts them as they
are. Folders written by `save_folder` (or community mlx-lm 4-bit conversions)
carry a `quantization` entry in config.json and load back as they are.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import compute_bits_per_weight, quantize_model as mlx_lm_quantize, save_config, save_model

from backends.types import UserError

BITS = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts for affine mode


def check_scheme(scheme: str, group_size: int) -> int:
    if scheme not in BITS:
        raise UserError(f"the MLX engine quantizes with {', '.join(BITS)} (mlx-lm affine); "
                        f"{scheme!r} is not one of them")
    if group_size not in GROUP_SIZES:
        raise UserError(f"MLX affine quantization takes a group size of {', '.join(map(str, GROUP_SIZES))}, "
                        f"not {group_size}")
    return BITS[scheme]


def is_quantized(model: nn.Module) -> bool:
    return any(hasattr(m, "bits") for _, m in model.named_modules())


def quantize_model(model: nn.Module, scheme: str, group_size: int) -> str:
    """Quantize `model` in place (the engine's load-time `--quantize` hook); describe what was done."""
    bits = check_scheme(scheme, group_size)
    if is_quantized(model):
        raise UserError("this model folder is already quantized (its config.json has a `quantization` entry); "
                        "load it without --quantize")
    # mlx-lm prints its bits-per-weight line; the description below carries it instead.
    with contextlib.redirect_stdout(io.StringIO()):
        mlx_lm_quantize(model, {}, group_size, bits, mode="affine")
    mx.eval(model.parameters())
    packed = sum(1 for _, m in model.named_modules() if hasattr(m, "bits"))
    kept = [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and not hasattr(m, "bits")]
    note = f", {len(kept)} layers left in full precision (width not divisible by {group_size})" if kept else ""
    return (f"{scheme} (mlx-lm affine, group {group_size}, {packed} layers packed, "
            f"{compute_bits_per_weight(model):.2f} bits per weight with scales{note})")


def save_folder(backend, out: Path, scheme: str, group_size: int) -> str:
    """Quantize a loaded full-precision MLX backend and write an mlx-lm folder at `out`:
    what `mlx_lm.convert -q` writes (packed safetensors, config.json with
    `quantization`, the tokenizer and generation config of the source folder)."""
    description = quantize_model(backend.model, scheme, group_size)
    save_quantized(backend, out)
    backend.quantization = description
    return description


# ------------------------------------------------------------- LoRA into a quantized base


def adapter_logits(backend, ids: list[int]) -> tuple:
    """(base alone, base + adapter) logits of a model carrying mlx-lm LoRA layers."""
    from mlx_lm.tuner.lora import LoRALinear

    layers = [m for _, m in backend.model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise UserError("the model carries no LoRA adapter to fuse")
    adapted = backend.logits(ids)
    scales = [m.scale for m in layers]
    for m in layers:  # the update is scale * x @ a @ b: scale 0 is the base alone
        m.scale = 0.0
    try:
        base = backend.logits(ids)
    finally:
        for m, s in zip(layers, scales):
            m.scale = s
    return base, adapted


def fuse_adapter(backend, requantize: bool = True) -> str:
    """Fuse the LoRA layers into their quantized base layers, in place: mlx-lm's
    LoRALinear.fuse dequantizes, adds scale * b.T @ a.T and re-quantizes with the
    layer's own bits and group size (requantize=False: the fused layers stay in
    full precision, the others quantized)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    fused = [(n, m.fuse(dequantize=not requantize)) for n, m in backend.model.named_modules()
             if isinstance(m, LoRALinear)]
    backend.model.update_modules(tree_unflatten(fused))
    mx.eval(backend.model.parameters())
    return f"{len(fused)} layers dequantized, fused" + (
        " and re-quantized" if requantize else ", kept in full precision")


def save_quantized(backend, out: Path) -> None:
    """Write an already-quantized loaded model as an mlx-lm folder."""
    first = next(m for _, m in backend.model.named_modules() if hasattr(m, "bits"))
    config = dict(backend.config, quantization={"group_size": first.group_size, "bits": first.bits,
                                                "mode": getattr(first, "mode", "affine")})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, backend.model)
    save_config(config, config_path=out / "config.json")
    backend.tokenizer.save_pretrained(out)
    if (Path(backend.path) / "generation_config.json").is_file():
        shutil.copy(Path(backend.path) / "generation_config.json", out)
