"""Reading an HF-format model folder without loading it: config, weight sizes, EOS ids.

Both engines read a folder the same way through these helpers, so they agree
on what the model is before either loads a byte of weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

from backends.types import UserError

log = logging.getLogger("billion")


@contextmanager
def building(out: Path):
    """Build a folder aside and rename it to `out` only when complete (an interrupted build leaves
    nothing that looks like a model); yields the folder to write into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_config(path: Path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise UserError(f"{path} is not a model folder (no config.json)")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{f}: cannot read ({e.strerror})") from None


def check_remote_code(path: Path, config: dict, trust_remote_code: bool) -> None:
    """Say so when a folder ships its own model code (auto_map) that is not run."""
    auto_map = config.get("auto_map")
    if auto_map and not trust_remote_code:
        arch = (config.get("architectures") or ["?"])[0]
        code = ", ".join(sorted({str(v) for v in auto_map.values()}))
        log.warning(f"{path} ships its own model code ({code}); it was not run (--trust-remote-code runs "
                    f"it): using the engine's built-in {arch} instead")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The folder's transformers tokenizer (both engines use it); an unreadable one is a UserError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # a damaged tokenizer.json surfaces as whatever its parser raises
        files = [f.name for f in Path(path).glob("tokenizer*")] or ["no tokenizer files"]
        raise UserError(f"{path}: cannot read the tokenizer ({', '.join(sorted(files))}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


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
        for name, meta in _safetensors_header(f).items():
            if name != "__metadata__":
                out[name] = (meta["dtype"], meta["shape"])
    return out


def _safetensors_header(f: Path) -> dict:
    """The header of one safetensors file, checked against the file's size (a cut-off
    download has a whole header and too few bytes after it)."""
    bad = f"{f}: unreadable safetensors file, truncated or damaged"
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > size - 8:
                raise UserError(f"{bad} (header of {n:,} bytes in a {size:,}-byte file)")
            header = json.loads(fh.read(n))
        end = max((m["data_offsets"][1] for k, m in header.items() if k != "__metadata__"), default=0)
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{bad} ({type(e).__name__})") from None
    except OSError as e:
        raise UserError(f"{f}: cannot read ({e.strerror})") from None
    if 8 + n + end > size:
        raise UserError(f"{bad} ({size:,} bytes, its header describes {8 + n + end:,})")
    return header


def parameter_count(path: Path) -> int:
    total = 0
    for _, shape in tensor_shapes(path).values():
        n = 1
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
