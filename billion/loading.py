"""From a model spec to a loaded engine: find or build the folder, check it fits, load it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path

import backends
from backends.base import Backend
from backends.types import UserError
from backends import host
from backends.folders import billion_home, hf_folder
from backends.folders.digests import folder_digest
from billion.models import ModelSpec, parse_spec

# What a Hub download fetches: safetensors weights only (pickle weights can run code).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]

BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2}


def synthetic_path(spec: ModelSpec) -> Path:
    return billion_home() / "models" / f"{spec.kind}-{spec.card.alias}-v1"


def model_folder(spec: ModelSpec, progress: bool = True) -> Path:
    """The local HF-format folder for a spec: built, downloaded, or as given."""
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
    step (pairing a draft, loading on each engine, records, checkpoints) is given instead of the text."""

    spec: ModelSpec
    folder: Path

    def __str__(self) -> str:
        return self.spec.text

    @property
    def card(self):
        """The registry's card (alias, licence, family), or None for a folder or Hub id it does not know."""
        return self.spec.card

    @cached_property
    def source(self) -> dict | None:
        """Where the weights came from, as records say it: a GGUF file and its quantization type,
        seeded random weights, or None (a folder as published, a Hub snapshot)."""
        return hf_folder.provenance(self.folder)

    @cached_property
    def digest(self) -> str:
        """A hash of the folder's content (config, weights, tokenizer), each file hashed once per
        size and modification time: what a checkpoint's identity uses, so a changed folder never
        resumes an old run."""
        return folder_digest(self.folder)


def resolve(text: str, progress: bool = True) -> ResolvedModel:
    """Parse the spec and find, build, convert or download its folder: once per command."""
    return resolve_spec(parse_spec(text), progress)


def resolve_spec(spec: ModelSpec, progress: bool = True) -> ResolvedModel:
    """An already parsed spec's folder (a command that checks two specs against each other first)."""
    return ResolvedModel(spec, model_folder(spec, progress))


def derived(folder: Path, label: str) -> ResolvedModel:
    """A folder billion built from another (a layers:N draft, a damped target) as a model of its own."""
    return ResolvedModel(ModelSpec(label, "folder", None, path=folder), folder)


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


def load(engine: str, model: ResolvedModel, options: "LoadOptions | None" = None) -> Backend:
    """Load a resolved model on one engine, after checking its weights fit in memory."""
    options = options or LoadOptions()
    cls = backends.get(engine)  # fails early, naming the install command
    if not options.quantize:
        check_memory(model.folder, options.dtype, engine, options.device)
    return cls.load(model.folder, **options.engine_kwargs())


@dataclass(frozen=True)
class LoadOptions:
    """How every model-loading command loads a model (its --device, --dtype, --quantize, ... options)."""

    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    group_size: int = 64
    trust_remote_code: bool = False
    compile: bool = False  # torch only: a torch.compile'd decode step

    @classmethod
    def from_options(cls, opts: dict) -> "LoadOptions":
        """From a command's keyword options (the ones it does not take keep their defaults)."""
        return cls(**{f.name: opts[f.name] for f in fields(cls) if opts.get(f.name) is not None})

    def for_engine(self, engine: str) -> "tuple[LoadOptions, str | None]":
        """The options as `engine` takes them, and why one was dropped: --compile is a torch option,
        so in a several-engine run the other engines decode as usual (the one place this is decided)."""
        if self.compile and not backends.get(engine).compiles:
            return replace(self, compile=False), f"--compile is a torch option: {engine} decodes as usual"
        return self, None

    def engine_kwargs(self) -> dict:
        return asdict(self)

    def record(self) -> dict:
        """What records' config says of the loading."""
        return asdict(self)
