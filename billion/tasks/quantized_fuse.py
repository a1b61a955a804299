"""Fusing a LoRA adapter into a quantized base without losing it.

Re-quantizing W + ΔW rounds ΔW onto the quantization grid: an adapter whose
updates are smaller than a quantization step vanishes, and the fused model is
the base again (what fusing into a 4-bit mlx-lm model silently does when that
happens). So the engine dequantizes, fuses and re-quantizes, and then the fused
model is checked, on the first tokens of a fixed text, against base + adapter:

  kept = 1 - ||L_fused - L_adapted|| / ||L_adapted - L_base||

over all logits L (1: the fused model is base + adapter; 0 or below: the
adapter is gone). Below MIN_KEPT the fuse is refused, naming what to do instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from backends.base import Backend
from backends.types import UserError

MIN_KEPT = 0.5
CHECK_TOKENS = 128
CHECK_FILE = "fuse_check.json"


def check_ids(backend: Backend) -> list[int]:
    from billion.tasks.quality import default_text

    return backend.tokenize(default_text())[: min(CHECK_TOKENS, backend.context_length)]


def adapter_kept(base: np.ndarray, adapted: np.ndarray, fused: np.ndarray) -> dict:
    effect = float(np.linalg.norm(adapted - base))
    lost = float(np.linalg.norm(fused - adapted))
    return {
        "adapter_effect_norm": effect,
        "fused_vs_adapted_norm": lost,
        "adapter_effect_kept": 1 - lost / effect if effect > 0 else None,
        "fused_vs_adapted_max_abs_logit_diff": float(np.abs(fused - adapted).max()),
        "fused_vs_adapted_top1_agreement": float((fused.argmax(-1) == adapted.argmax(-1)).mean()),
        "base_vs_adapted_top1_agreement": float((base.argmax(-1) == adapted.argmax(-1)).mean()),
    }


def fuse_quantized(backend: Backend, out: Path, requantize: bool = True) -> dict:
    """Fuse the adapter a quantized `backend` carries into its weights, check the
    adapter survived, and write the quantized fused folder at `out` (with the
    check as fuse_check.json). requantize=False keeps the fused layers in full
    precision (the rest stays quantized). Changes `backend` in place."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists")
    ids = check_ids(backend)
    base, adapted = backend.adapter_logits(ids)
    description = backend.fuse_adapter(requantize)
    check = {"fuse": description, "tokens": len(ids), **adapter_kept(base, adapted, backend.logits(ids))}
    kept = check["adapter_effect_kept"]
    if kept is not None and kept < MIN_KEPT:
        raise UserError(
            f"re-quantizing the fused weights kept {kept:.0%} of the adapter's effect on the logits: its updates "
            f"are smaller than a quantization step. Keep the fused layers in full precision (billion adapter-fuse "
            f"--keep-fused-layers-full), use the adapter unfused on the quantized base, or fuse it into the "
            f"full-precision model and quantize afterwards (billion quantize)")
    backend.save_quantized(out)
    (out / CHECK_FILE).write_text(json.dumps(check, indent=2) + "\n")
    return check


def fuse_folder(engine: str, base, adapter: Path, out: Path, requantize: bool = True) -> dict:
    """`billion adapter-fuse` on a quantized model folder (e.g. an mlx-lm 4-bit
    conversion): load it in its engine, put the adapter on (converted to that
    engine's format if needed), then fuse_quantized."""
    import tempfile

    from backends.folders.adapters import convert, detect
    from billion.loading import load

    want = "mlx" if engine == "mlx" else "peft"
    backend = load(engine, base)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if detect(adapter) != want:
                convert(adapter, Path(tmp) / "adapter", want)
                adapter = Path(tmp) / "adapter"
            backend.apply_adapter(Path(adapter))
        return fuse_quantized(backend, out, requantize)
    finally:
        backend.close()
