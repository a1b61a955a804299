"""Reading an HF-format model folder without loading it: config, weight sizes, EOS ids.

Both engines read a folder the same way through these helpers, so they agree
on what the model is before either loads a byte of weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from backends.base import UserError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4,
                "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_config(path: Path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise UserError(f"{path} is not a model folder (no config.json)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None


def safetensors_files(path: Path) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        bins = sorted(Path(path).glob("*.bin")) + sorted(Path(path).glob("*.pt*"))
        hint = (" (it has pickle weights, which billion does not load: they can run code; "
                "convert them to safetensors first)") if bins else ""
        raise UserError(f"no .safetensors weights in {path}{hint}")
    return files


def tensor_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) for every tensor, read from the safetensors headers only."""
    out = {}
    for f in safetensors_files(path):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                out[name] = (meta["dtype"], meta["shape"])
    return out


def parameter_count(path: Path) -> int:
    total = 0
    for _, shape in tensor_shapes(path).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def weight_bytes_on_disk(path: Path) -> int:
    total = 0
    for dtype, shape in tensor_shapes(path).values():
        n = _DTYPE_BYTES.get(dtype, 4)
        for d in shape:
            n *= d
        total += n
    return total


def provenance(path: Path) -> dict | None:
    """Where billion got a folder's weights (GGUF conversion, synthetic), from its config.json."""
    config = read_config(path)
    return config.get("billion_source") or config.get("billion_synthetic")


def eos_ids(path: Path, tokenizer) -> frozenset[int]:
    """EOS ids the way both mlx-lm and transformers' generate see them:
    generation_config.json wins over config.json; the tokenizer's EOS is added."""
    ids = read_config(path).get("eos_token_id")
    gen_file = Path(path) / "generation_config.json"
    if gen_file.is_file():
        try:
            ids = json.loads(gen_file.read_text()).get("eos_token_id", ids)
        except json.JSONDecodeError:
            pass
    ids = ids if isinstance(ids, list) else [ids]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(i for i in ids if i is not None)


def context_length(config: dict) -> int:
    return int(config.get("max_position_embeddings") or config.get("max_sequence_length") or 2048)
