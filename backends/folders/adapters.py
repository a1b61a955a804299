"""LoRA adapter folders of both engines: convert between them, fuse into a model folder.

mlx-lm: adapters.safetensors with `<module>.lora_a` [in, r] and `.lora_b`
[r, out] under mlx-lm's module names, and adapter_config.json with
`num_layers` and `lora_parameters` {rank, scale, dropout, keys}; the update is
scale * x @ lora_a @ lora_b.
PEFT: adapter_model.safetensors with `base_model.model.<module>.lora_A.weight`
[r, in] and `.lora_B.weight` [out, r] under transformers' module names, and
adapter_config.json with r, lora_alpha, target_modules; the update is
(lora_alpha / r) * x @ A.T @ B.T.
So A_peft = lora_a.T, B_peft = lora_b.T, scale = lora_alpha / r (or / sqrt(r)
with rsLoRA). Module names agree except GPT-NeoX's layers: mlx-lm `model.h.N`,
transformers `gpt_neox.layers.N`.

Everything here is numpy on raw safetensors files (no engine needed), so an
adapter trained on one engine converts and fuses on a machine with either.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np

from backends import training
from backends.types import UserError

MLX_FILE, PEFT_FILE, CONFIG_FILE = "adapters.safetensors", "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# transformers module prefix -> mlx-lm module prefix, where they differ
_MLX_NAMES = {"gpt_neox.layers.": "model.h."}

# ---------------------------------------------------------------- raw safetensors (bf16-aware)

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts; a damaged one is a UserError."""
    damaged = f"{path}: unreadable safetensors file, truncated or damaged"
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise UserError(damaged)
        n = struct.unpack("<Q", first)[0]
        text = f.read(min(n, 100_000_000))
    try:
        if len(text) != n:
            raise ValueError
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise UserError(damaged) from None
    if not isinstance(header, dict):
        raise UserError(damaged)
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(meta, dict) and isinstance(meta.get("dtype"), str)
                and isinstance(meta.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in meta["shape"])
                and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
                and all(isinstance(o, int) for o in meta["data_offsets"])):
            raise UserError(f"{damaged} (tensor {name})")
    return header, 8 + n


def _decode(blob: bytes, meta: dict, where: str = "") -> np.ndarray:
    """One tensor's bytes as numpy; `where` ("file: tensor name") names it in errors."""
    dtype = meta["dtype"]
    if dtype != "BF16" and dtype not in _NP:
        raise UserError(f"{where}: unknown dtype {dtype!r} (known: BF16, {', '.join(_NP)})")
    item = 2 if dtype == "BF16" else np.dtype(_NP[dtype]).itemsize
    if len(blob) != item * math.prod(meta["shape"]):
        raise UserError(f"{where}: {len(blob)} bytes do not hold a {dtype} tensor of shape {meta['shape']}")
    if dtype == "BF16":  # numpy has no bfloat16: widen (exact)
        arr = (np.frombuffer(blob, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(blob, _NP[dtype])
    return arr.reshape(meta["shape"])


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a file as numpy (bfloat16 widened to float32)."""
    header, start = _header(path)
    raw = Path(path).read_bytes()
    return {name: _decode(raw[start + meta["data_offsets"][0]:start + meta["data_offsets"][1]], meta,
                          f"{path}: tensor {name}")
            for name, meta in header.items() if name != "__metadata__"}


def _encode(arr: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":  # round to nearest even, as torch does
        u = np.ascontiguousarray(arr, np.float32).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype(np.uint16).tobytes()
    return np.ascontiguousarray(arr, _NP[dtype]).tobytes()


def write_tensors(path: Path, tensors: dict[str, tuple[str, bytes, list[int]]], metadata: dict | None = None) -> None:
    """Write name -> (safetensors dtype, bytes, shape), atomically."""
    header, offset, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, blob, shape) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = Path(path).with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)


def _save_float32(path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_tensors(path, {k: ("F32", _encode(v, "F32"), v.shape) for k, v in arrays.items()},
                  {"format": "pt"})


# ---------------------------------------------------------------- the two formats


def detect(folder: Path) -> str:
    folder = Path(folder)
    if (folder / MLX_FILE).is_file() and (folder / CONFIG_FILE).is_file():
        return "mlx"
    if (folder / PEFT_FILE).is_file() and (folder / CONFIG_FILE).is_file():
        return "peft"
    raise UserError(f"{folder} is not an adapter folder (expected {CONFIG_FILE} with {MLX_FILE} (mlx-lm) "
                    f"or {PEFT_FILE} (PEFT))")


def _to_mlx_name(hf: str) -> str:
    for a, b in _MLX_NAMES.items():
        if hf.startswith(a):
            return b + hf[len(a):]
    return hf


def _to_hf_name(mlx: str) -> str:
    for a, b in _MLX_NAMES.items():
        if mlx.startswith(b):
            return a + mlx[len(b):]
    return mlx


def read_lora(folder: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, dict]:
    """transformers module name -> (A [r, in], B [out, r]) in float32, the scale, and the config."""
    folder = Path(folder)
    kind = detect(folder)
    config = _read_config(folder / CONFIG_FILE)
    pairs, scale, keys = (_mlx_pairs if kind == "mlx" else _peft_pairs)(folder, config)
    weights = folder / (MLX_FILE if kind == "mlx" else PEFT_FILE)
    out = {}
    for module, p in pairs.items():
        if set(p) != set(keys):
            raise UserError(f"{folder}: {module} lacks one of {', '.join(keys)}")
        a, b = p[keys[0]], p[keys[1]]  # [r, in], [out, r] whichever the format
        if a.shape[0] == 0 or a.shape[0] != b.shape[1]:
            raise UserError(f"{weights}: {module}: A is [r={a.shape[0]}, in={a.shape[1]}] and B is "
                            f"[out={b.shape[0]}, r={b.shape[1]}]; LoRA needs the same r of at least 1")
        out[module] = (a, b)
    if not out:
        raise UserError(f"{weights}: no LoRA weights")
    return out, scale, config


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_bytes())
    except (ValueError, RecursionError) as e:
        raise UserError(f"{config_file}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: expected a JSON object")
    return config


def _number(value, what: str, config_file: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{config_file}: {what} must be a number, found {value!r}")
    return value


def _mlx_pairs(folder: Path, config: dict) -> tuple[dict, float, tuple[str, str]]:
    """mlx-lm's adapter: module -> {lora_a, lora_b} transposed to [r, in] and [out, r], its scale."""
    config_file = folder / CONFIG_FILE
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(f"{folder}: only LoRA adapters convert (this is {config['fine_tune_type']})")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "scale" not in params:
        raise UserError(f"{config_file}: no lora_parameters.scale")
    if "rank" in params and _number(params["rank"], "lora_parameters.rank", config_file) <= 0:
        raise UserError(f"{config_file}: LoRA rank must be at least 1, found {params['rank']}")
    weights = folder / MLX_FILE
    pairs: dict[str, dict] = {}
    for name, arr in read_tensors(weights).items():
        if "." not in name or arr.ndim != 2:
            raise UserError(f"{weights}: {name} is not a LoRA matrix ([in, r] lora_a or [r, out] lora_b; "
                            f"shape {list(arr.shape)})")
        module, leaf = name.rsplit(".", 1)
        pairs.setdefault(_to_hf_name(module), {})[leaf] = arr.astype(np.float32).T
    return pairs, float(_number(params["scale"], "lora_parameters.scale", config_file)), ("lora_a", "lora_b")


def _peft_pairs(folder: Path, config: dict) -> tuple[dict, float, tuple[str, str]]:
    """peft's adapter: module -> {lora_A, lora_B}, its scale (alpha / r, or / sqrt(r) with rsLoRA)."""
    config_file = folder / CONFIG_FILE
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise UserError(f"{folder}: only plain LoRA adapters convert")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise UserError(f"{config_file}: no {key!r}")
    r, alpha = _number(config["r"], "r", config_file), _number(config["lora_alpha"], "lora_alpha", config_file)
    if r <= 0:
        raise UserError(f"{config_file}: LoRA r must be at least 1, found {config['r']}")
    weights = folder / PEFT_FILE
    pairs: dict[str, dict] = {}
    for name, arr in read_tensors(weights).items():
        stem = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        parts = stem.rsplit(".", 2)
        if len(parts) != 3 or parts[1] not in ("lora_A", "lora_B"):
            raise UserError(f"{folder}: {name} is not a LoRA weight (only LoRA A/B matrices convert)")
        if arr.ndim != 2:
            raise UserError(f"{weights}: {name} has shape {list(arr.shape)}; a LoRA matrix has two dimensions")
        pairs.setdefault(parts[0], {})[parts[1]] = arr.astype(np.float32)
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return pairs, scale, ("lora_A", "lora_B")


def write_peft(folder: Path, lora: dict, scale: float, base: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    r = next(iter(lora.values()))[0].shape[0]
    arrays = {}
    for module, (a, b) in lora.items():
        arrays[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        arrays[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    _save_float32(folder / PEFT_FILE, arrays)
    targets = sorted({m.rsplit(".", 1)[-1] for m in lora})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": scale * r,
              "lora_dropout": 0.0, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "inference_mode": True, "base_model_name_or_path": base}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def write_mlx(folder: Path, lora: dict, scale: float, num_layers: int | None = None, model_type: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    r = next(iter(lora.values()))[0].shape[0]
    arrays, keys, layers = {}, set(), set()
    for module, (a, b) in lora.items():
        mlx = _to_mlx_name(module)
        arrays[f"{mlx}.lora_a"] = a.T
        arrays[f"{mlx}.lora_b"] = b.T
        layer, inner = training.layer_key(module)
        layers.add(layer)
        keys.add(inner)
    _save_float32(folder / MLX_FILE, arrays)
    # mlx-lm adapts the last `num_layers` layers; an adapter on every layer covers 0..max
    config = {"fine_tune_type": "lora", "num_layers": num_layers or max(layers) + 1, "model_type": model_type,
              "lora_parameters": {"rank": r, "scale": scale, "dropout": 0.0, "keys": sorted(keys)}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def convert(src: Path, dst: Path, to: str | None = None) -> str:
    """Convert an adapter folder to the other engine's format (or `to`: mlx|peft); returns the format written."""
    src, dst = Path(src), Path(dst)
    kind = detect(src)
    to = to or ("peft" if kind == "mlx" else "mlx")
    if to not in ("mlx", "peft"):
        raise UserError(f"unknown adapter format {to!r}; choose mlx or peft")
    if src.resolve() == dst.resolve():
        raise UserError("write the converted adapter to another folder")
    lora, scale, config = read_lora(src)
    if to == "peft":
        write_peft(dst, lora, scale, base=config.get("base_model_name_or_path", ""))
    else:
        write_mlx(dst, lora, scale, model_type=config.get("model_type", ""))
    return to


# ---------------------------------------------------------------- fusing


def fuse(base: Path, adapter: Path, out: Path) -> Path:
    """A model folder with W + scale * B @ A in every adapted layer, in the
    base's names and dtypes (other tensors copied byte for byte), loadable by
    both engines."""
    base, out = Path(base), Path(out)
    config = json.loads((base / "config.json").read_text())
    if "quantization" in config or "quantization_config" in config:
        raise UserError(f"{base} is quantized; fuse the adapter into the unquantized model folder")
    lora, scale, _ = read_lora(adapter)
    wanted = {f"{m}.weight": m for m in lora}
    if out.exists():
        raise UserError(f"{out} already exists")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    found = set()
    for shard in sorted(base.glob("*.safetensors")):
        header, start = _header(shard)
        raw = shard.read_bytes()
        tensors = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            blob = raw[start + a:start + b]
            if name in wanted:
                lo_a, lo_b = lora[wanted[name]]
                if list(meta["shape"]) != [lo_b.shape[0], lo_a.shape[1]]:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise UserError(f"{adapter}: {wanted[name]} is [out={lo_b.shape[0]}, in={lo_a.shape[1]}] "
                                    f"but the base model's {name} is {list(meta['shape'])}: "
                                    f"not an adapter for this model")
                fused = _decode(blob, meta, f"{shard}: tensor {name}").astype(np.float32) + scale * (lo_b @ lo_a)
                blob = _encode(fused, meta["dtype"])
                found.add(name)
            tensors[name] = (meta["dtype"], blob, meta["shape"])
        write_tensors(tmp / shard.name, tensors, header.get("__metadata__"))
    missing = sorted(set(wanted) - found)
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{base} has no weight {missing[0]} (and {len(missing) - 1} more) for this adapter")
    tmp.rename(out)
    return out
