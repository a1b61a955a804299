"""From a model spec to a loaded engine: find or build the folder, check it fits, load it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import backends
from backends.base import Backend
from backends.types import UserError
from backends import host
from backends.folders import billion_home, hf_folder
from billion.models import ModelSpec, parse_spec

# What a Hub download fetches: safetensors weights only (pickle weights can run code).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]

BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2}


def synthetic_path(spec: ModelSpec) -> Path:
    return billion_home() / "models" / f"{spec.kind}-{spec.card.alias}-v1"


def model_folder(spec: ModelSpec | str, progress: bool = True) -> Path:
    """The local HF-format folder for a spec: built, downloaded, or as given."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "folder":
        hf_folder.read_config(spec.path)
        return spec.path
    if spec.kind == "gguf":
        from backends.folders.gguf_folder import convert

        return convert(spec.path, billion_home() / "models", progress)
    if spec.kind in ("random", "tiny"):
        from backends.folders.synthetic import build_folder

        return build_folder(synthetic_path(spec), spec.card.config, spec.card.family, tiny=spec.kind == "tiny")
    return download(spec, progress)


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec turned, once, at the command's edge, into its local folder: what every later
    step (pairing a draft, loading on each engine, records) is given instead of the text."""

    spec: ModelSpec
    folder: Path

    def __str__(self) -> str:
        return self.spec.text


def resolve(model: "ResolvedModel | ModelSpec | str", progress: bool = True) -> ResolvedModel:
    """Parse the spec and find, build, convert or download its folder (once; a ResolvedModel passes)."""
    if isinstance(model, ResolvedModel):
        return model
    spec = parse_spec(model) if isinstance(model, str) else model
    return ResolvedModel(spec, model_folder(spec, progress))


def weights_source(spec: "ResolvedModel | ModelSpec | str") -> dict | None:
    """What a record says the weights are: a GGUF file with its quantization type, seeded random
    weights, or None (a folder as published, a Hub id). From the folder when resolved, else from
    the spec alone (no conversion, no download)."""
    if isinstance(spec, ResolvedModel):
        return hf_folder.provenance(spec.folder)
    try:
        spec = parse_spec(spec) if isinstance(spec, str) else spec
    except UserError:
        return None
    if spec.kind == "gguf":
        from backends.folders.gguf_folder import read_header

        header = read_header(spec.path)
        return {"kind": "gguf", "file": spec.path.name, "quantization": header["quantization"],
                "note": f"{header['quantization']} GGUF weights, dequantized: not the original weights"}
    if spec.kind in ("random", "tiny"):
        return {"kind": spec.kind, "note": "seeded random weights: speed and memory only, not quality"}
    return None


def download(spec: ModelSpec, progress: bool = True) -> Path:
    """Fetch (or find in the HF cache) a Hub model; honours HF_HOME and HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    alias = spec.card.alias if spec.card else None
    offline_hint = f"; for speed and memory without the weights use random:{alias}" if alias else ""
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        path = Path(snapshot_download(spec.hub_id, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise UserError(f"{spec.hub_id} is gated: accept its licence at https://huggingface.co/{spec.hub_id} "
                        f"and log in with `hf auth login` (or set HF_TOKEN){offline_hint}") from None
    except RepositoryNotFoundError:
        raise UserError(f"no model {spec.hub_id!r} on the Hub (or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise UserError(f"the weights of {spec.hub_id} are not in the local Hugging Face cache "
                        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and downloading is not possible "
                        f"(offline){offline_hint}") from None
    except OSError as e:  # network failures surface as requests/httpx OSErrors
        raise UserError(f"could not download {spec.hub_id}: {e}{offline_hint}") from None
    hf_folder.safetensors_files(path)
    return path


def check_memory(path: Path, dtype: str | None, engine: str, device: str | None) -> None:
    """Refuse, before loading, a model whose weights cannot fit in memory."""
    params = hf_folder.parameter_count(path)
    per = BYTES_PER_DTYPE.get(dtype or "", 4)  # the CPU default is float32: assume the worst
    need = params * per
    if device and device.startswith("cuda"):
        return  # the engine reports CUDA out-of-memory itself; host RAM is not the limit
    have = host.available_memory_bytes()
    if need * 1.1 > have:
        raise UserError(f"{path.name} needs about {need / 1e9:.1f} GB for its weights in {dtype or 'float32'} "
                        f"({params / 1e9:.2f}B parameters) but only {have / 1e9:.1f} GB of memory is available "
                        f"to the {engine} engine; try --dtype bfloat16 or --quantize int8")


def load(engine: str, model: ResolvedModel | ModelSpec | str, *, device=None, dtype=None,
         trust_remote_code=False, quantize=None, group_size=64, compile=False, progress=True) -> Backend:
    cls = backends.get(engine)  # fails early, naming the install command
    if compile and not cls.compiles:
        raise UserError(f"--compile is a torch engine option; the {engine} engine has no compiled decode step "
                        f"(use -b torch)")
    path = resolve(model, progress).folder
    if not quantize:
        check_memory(path, dtype, engine, device)
    extra = {"compile": True} if compile else {}
    return cls.load(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                    quantize=quantize, group_size=group_size, **extra)
