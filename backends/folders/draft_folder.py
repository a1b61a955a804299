"""Folders derived from a model folder for speculative decoding, offline.

- `write_layer_draft`: a draft made of the target's own first layers plus its
  final norm and output head (a self-speculative, early-exit draft). It shares
  the target's tokenizer by construction and costs about n/L of it per token.
- `write_damped_target`: the same target with the output projections of its
  deeper layers scaled by a factor. Only for random-weight demonstrations: with
  random weights every layer moves the argmax, so a shallow draft agrees with
  the target ~0% of the time; shrinking what the deeper layers add to the
  residual stream makes acceptance real while the compute (and so the timing)
  stays exactly the same.

Tensors are read and written with safetensors' torch API, as backends/folders/synthetic.py
does (numpy has no bfloat16).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from backends.folders import hf_folder
from backends.types import UserError

_LAYER = re.compile(r"\.layers\.(\d+)\.")
# What each layer adds to the residual stream: attention output and MLP output projections
# (Llama/StableLM names, then GPT-NeoX names).
_OUTPUT_PROJECTIONS = ("self_attn.o_proj.", "mlp.down_proj.", "attention.dense.", "mlp.dense_4h_to_h.")
_SKIP_FILES = {"model.safetensors.index.json", "config.json"}


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _tensors(src: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in hf_folder.safetensors_files(src):
        tensors.update(load_file(f))
    return tensors


def _write(out: Path, src: Path, tensors: dict, config: dict) -> Path:
    """Write tensors + config + src's other files (tokenizer, generation config), atomically."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is an ordinary model folder
    try:
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in _SKIP_FILES:
                shutil.copy2(f, tmp / f.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_layer_draft(src: Path, out: Path, num_layers: int) -> Path:
    """A draft with the first `num_layers` layers of `src` and its embeddings, final norm and head."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    config = hf_folder.read_config(src)
    total = int(config.get("num_hidden_layers", 0))
    if not 1 <= num_layers < total:
        raise UserError(f"a layers:N draft needs 1 <= N < {total} (the target's layer count); got {num_layers}")
    tensors = {k: v for k, v in _tensors(src).items() if layer_index(k) is None or layer_index(k) < num_layers}
    config = dict(config, num_hidden_layers=num_layers,
                  billion_draft={"from": str(src), "layers": num_layers,
                                 "note": f"the first {num_layers} of {total} layers, final norm and head"})
    return _write(out, src, tensors, config)


def write_damped_target(src: Path, out: Path, from_layer: int, factor: float) -> Path:
    """`src` with the output projections of layers >= from_layer multiplied by `factor`."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    config = hf_folder.read_config(src)
    tensors = _tensors(src)
    scaled = 0
    for name, t in tensors.items():
        i = layer_index(name)
        if i is not None and i >= from_layer and any(p in name for p in _OUTPUT_PROJECTIONS):
            tensors[name] = (t.float() * factor).to(t.dtype)
            scaled += 1
    if not scaled:
        raise UserError(f"{src}: no layer output projections found to damp (unknown weight names)")
    config = dict(config, billion_damped={
        "from": str(src), "from_layer": from_layer, "factor": factor,
        "note": f"output projections of layers >= {from_layer} scaled by {factor} so a {from_layer}-layer "
                "draft agrees with these random weights; same compute, demonstration only"})
    return _write(out, src, tensors, config)


def tokenizer_vocabulary(folder: Path) -> dict[str, int]:
    """Token string -> id of a folder's tokenizer, added special tokens included."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()
