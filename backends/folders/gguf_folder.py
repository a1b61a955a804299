"""GGUF files as models: converted once into a cached HF safetensors folder.

transformers' GGUF reader (`from_pretrained(dir, gguf_file=name)`, with the
`gguf` package) dequantizes the file; the folder it yields is written with the
config keys Hub folders have (`rope_theta`, not transformers 5's
`rope_parameters`; `architectures` filled in), so mlx-lm and transformers read
the same architecture from it. The folder is keyed by the file's content
(sha256), so a changed file is converted again and a renamed one is not.

Dequantized weights are not the original model's: a Q4_1 file dequantized to
float32 carries Q4_1's rounding. The folder's config says so
(`billion_source`: file, sha256, quantization type), and every record that
loads it names them.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from backends.folders import hf_folder
from backends.folders.digests import file_digest
from backends.types import UserError

GGUF_MAGIC = b"GGUF"
# llama.cpp's general.file_type (enum llama_ftype) -> the name llama.cpp prints.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
              17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}
INSTALL_GGUF = "pip install gguf"


# GGUF value types (gguf-py's GGUFValueType) -> their size in bytes; 8 is a string, 9 an array
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_lengths(path: Path) -> None:
    """Walk the header and the tensor table, checking every count and length against the bytes the
    file has, before gguf's reader sees them: a damaged length (a flipped byte) would otherwise have
    that reader allocate whatever it says, gigabytes, before failing. A UserError on the first
    count or length the file cannot hold."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        size, pos = len(m), 4

        def take(fmt: str):
            nonlocal pos
            need = struct.calcsize(fmt)
            if pos + need > size:
                raise UserError(f"{path}: unreadable GGUF file, truncated or damaged (ends inside its header)")
            value = struct.unpack_from("<" + fmt, m, pos)
            pos += need
            return value[0] if len(value) == 1 else value

        def skip(n: int, what: str) -> None:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise UserError(f"{path}: unreadable GGUF file, truncated or damaged ({what} of {n} bytes "
                                f"at byte {pos}, in a file of {size})")
            pos += n

        def value(kind: int, depth: int = 0) -> None:
            if kind in _SCALAR_SIZES:
                skip(_SCALAR_SIZES[kind], "a value")
            elif kind == _STRING:
                skip(take("Q"), "a string")
            elif kind == _ARRAY and depth == 0:
                item, count = take("I"), take("Q")
                if item in _SCALAR_SIZES:
                    skip(count * _SCALAR_SIZES[item], "an array")
                elif count * 8 > size - pos:  # every item takes at least 8 bytes (a length)
                    skip(count * 8, "an array")
                else:
                    for _ in range(count):
                        value(item, depth + 1)
            else:
                raise UserError(f"{path}: unreadable GGUF file, truncated or damaged (value type {kind})")

        take("I")  # version
        tensors, kvs = take("Q"), take("Q")
        if kvs * 12 > size or tensors * 24 > size:  # a key-value pair takes >= 12 bytes, a tensor's info >= 24
            raise UserError(f"{path}: unreadable GGUF file, truncated or damaged ({kvs} keys and {tensors} tensors "
                            f"do not fit in {size} bytes)")
        for _ in range(kvs):
            skip(take("Q"), "a key")
            value(take("I"))
        for _ in range(tensors):
            skip(take("Q"), "a tensor name")
            dims = take("I")
            if dims > 8:
                raise UserError(f"{path}: unreadable GGUF file, truncated or damaged (a tensor of {dims} dimensions)")
            skip(8 * dims + 4 + 8, "a tensor's shape, type and offset")


def read_header(path: Path) -> dict:
    """What the file says about itself: architecture, name, quantization type, tensor types.

    A file that is not GGUF, or is cut short, is a UserError naming it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        import gguf
    except ImportError:
        raise UserError(f"reading {path.name} needs the gguf package: {INSTALL_GGUF}") from None

    check_lengths(path)
    try:
        # A file cut short or damaged anywhere in its header or tensor table fails inside gguf's
        # reader with whatever the bytes it got lead to (ValueError, IndexError, KeyError,
        # struct.error, OverflowError...): all of them mean the same thing here.
        reader = gguf.GGUFReader(str(path))

        def field(key, default=None):
            f = reader.fields.get(key)
            return f.contents() if f is not None else default

        types = Counter(t.tensor_type.name for t in reader.tensors)
        file_type = field("general.file_type")
        architecture, name = field("general.architecture", "?"), field("general.name")
        quantization = (FILE_TYPES.get(file_type, f"file type {file_type}") if file_type is not None
                        else types.most_common(1)[0][0] if types else None)
    except Exception as e:  # noqa: BLE001 -- see above
        why = (str(e).splitlines() or [""])[0][:160] or type(e).__name__
        raise UserError(f"{path}: unreadable GGUF file, truncated or damaged ({why})") from None
    if quantization is None:
        raise UserError(f"{path}: a GGUF file with no tensors")
    return {
        "architecture": architecture,
        "name": name,
        "quantization": quantization,
        "tensor_types": dict(types),
    }


def _hub_style(config: dict, architecture: str) -> dict:
    """transformers 5's config dict -> the keys a Hub folder (and mlx-lm) reads."""
    import numpy as np

    drop = {"quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
            "id2label", "label2id", "return_dict", "output_hidden_states", "output_attentions",
            "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "dtype"}
    out = {k: v for k, v in config.items() if k not in drop}
    rope = out.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    out["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    # GGUF stores float32: 1e-5 comes back as 9.99999974e-06. Print it as the shortest float32.
    for k, v in out.items():
        if isinstance(v, float):
            out[k] = float(str(np.float32(v)))
    out["architectures"] = [architecture]
    out["torch_dtype"] = "float32"
    return out


@contextmanager
def _progress_bars(show: bool):
    """transformers' bars on or off while converting, then as they were. Its GGUF reader draws
    its tensor bar with plain tqdm, which transformers' own switch does not reach."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was, bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    gguf_utils.tqdm = partial(bar, disable=not show)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def convert(path: Path, cache_dir: Path, progress: bool = True) -> Path:
    """The HF folder for GGUF file `path`, converted once into `cache_dir`."""
    path = Path(path).expanduser().resolve()
    header = read_header(path)
    digest = file_digest(path)
    out = Path(cache_dir) / f"gguf-{path.stem}-{digest[:12]}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _progress_bars(progress):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as e:  # transformers: "GGUF model with architecture X is not supported yet."
        raise UserError(f"{path.name}: transformers' GGUF reader cannot convert architecture "
                        f"{header['architecture']!r} ({str(e).splitlines()[0]})") from None
    config = _hub_style(model.config.to_dict(), type(model).__name__)
    config["billion_source"] = {
        "kind": "gguf", "file": path.name, "path": str(path), "sha256": digest,
        "quantization": header["quantization"], "tensor_types": header["tensor_types"],
        "note": f"{header['quantization']} GGUF weights dequantized to float32: not the original "
                f"{'bf16 ' if header['quantization'] not in ('F32', 'F16', 'BF16') else ''}weights"}
    # save_pretrained refuses a model still marked as quantized; its weights are plain tensors now.
    model.config.quantization_config = None
    model.is_quantized = False
    model.hf_quantizer = None

    with hf_folder.building(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out
