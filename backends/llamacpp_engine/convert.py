"""An HF folder as the GGUF file llama.cpp runs, made the way llama.cpp's users make it.

llama.cpp's own `convert_hf_to_gguf.py` writes F32, F16 or BF16 from the folder; Q8_0 and Q4_0 are
then made from the F32 file by llama.cpp's quantizer (`llama_model_quantize`, what `llama-quantize`
runs), so the peer gets exactly what a llama.cpp user would build from the same weights. The
converter is not in the llama-cpp-python wheel, only in its source distribution:
scripts/setup_llamacpp.sh unpacks it (with its own gguf-py, which must match it) next to the
cache. Files are cached under $BILLION_HOME/gguf, keyed by the folder's path and the size and
modification time of its config and weights, so a rewritten folder is converted again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from backends import host
from backends.folders import billion_home, hf_folder
from backends.types import UserError

SETUP = "bash scripts/setup_llamacpp.sh"
# billion's precision names -> (GGUF file type written by the converter, llama_ftype to quantize to)
FLOAT_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
QUANT_TYPES = {"int8": ("Q8_0", 7), "int4": ("Q4_0", 2)}  # LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_0


def converter_dir(version: str) -> Path:
    """Where setup_llamacpp.sh put llama.cpp's converter for llama-cpp-python `version`."""
    found = Path(os.environ.get("BILLION_LLAMA_CPP", billion_home() / f"llama.cpp-{version}"))
    if not (found / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"llama.cpp's convert_hf_to_gguf.py is not in {found}; run: {SETUP} "
                        f"(or set BILLION_LLAMA_CPP to a llama.cpp checkout)")
    return found


def folder_key(path: Path) -> str:
    files = [path / "config.json", *hf_folder.safetensors_files(path)]
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def gguf_file(path: Path, version: str, dtype: str, quantize: str | None) -> Path:
    """The cached GGUF file for folder `path` at `dtype`, or quantized (int8 -> Q8_0, int4 -> Q4_0)."""
    path = Path(path)
    out_dir = billion_home() / "gguf"
    stem = f"{path.name}-{folder_key(path)}"
    if quantize:
        name, ftype = QUANT_TYPES[quantize]
        out = out_dir / f"{stem}-{name}.gguf"
        if not out.is_file():
            _quantize(gguf_file(path, version, "float32", None), out, ftype)
        return out
    out = out_dir / f"{stem}-{FLOAT_TYPES[dtype].upper()}.gguf"
    if not out.is_file():
        _convert(path, out, FLOAT_TYPES[dtype], converter_dir(version))
    return out


def _convert(path: Path, out: Path, outtype: str, tools: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools / "gguf-py"), str(tools)])}
    cmd = [sys.executable, str(tools / "convert_hf_to_gguf.py"), str(path), "--outfile", str(tmp),
           "--outtype", outtype]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            hint = (" (the converter knows only published tokenizers by their hash; billion's random: and tiny: "
                    "folders carry a home-made one, so llama.cpp can run only real models)"
                    if "pre-tokenizer was not recognized" in last else "")
            raise UserError(f"llama.cpp's convert_hf_to_gguf.py could not convert {path}: {last}{hint}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _quantize(src: Path, out: Path, ftype: int) -> None:
    import llama_cpp

    tmp = out.with_name(f".{out.name}.part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = host.usable_cores()
    try:
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise UserError(f"llama.cpp could not quantize {src.name}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
