"""Engine registry: names -> "module:Class", imported only when asked for.

Importing this package imports neither mlx nor torch, so `billion --help`
works with either engine missing.
"""

from __future__ import annotations

import importlib
import logging

from backends.types import UserError
from backends.host import is_apple_silicon

ENGINES = {
    "mlx": "backends.mlx_engine.backend:MLXBackend",
    "torch": "backends.torch_engine.backend:TorchBackend",
    # a peer: the tool to compare billion with, named explicitly (never part of "all")
    "llama.cpp": "backends.llamacpp_engine.backend:LlamaCppBackend",
}
PEERS = ("llama.cpp",)

# What to import to know an engine works, and how to install it when it does not.
_PROBES = {"mlx": ("mlx.core", "mlx_lm"), "torch": ("torch", "transformers"), "llama.cpp": ("llama_cpp", "gguf")}
INSTALL = {
    "mlx": 'pip install mlx-lm "mlx[cpu]"   (on macOS with Apple Silicon: pip install mlx-lm)',
    "torch": "pip install torch transformers",
    "llama.cpp": "bash scripts/setup_llamacpp.sh   (builds llama-cpp-python from source, ~10 minutes)",
}


# transformers imports torchao (when installed) on every model load; torchao then warns
# about its CUDA-only extensions and a deprecated pytree registration: noise, not news.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


class EngineUnavailable(UserError):
    pass


def _probe(name: str) -> str | None:
    """None when the engine imports, else the import error."""
    for module in _PROBES[name]:
        try:
            importlib.import_module(module)
        except Exception as e:  # a broken install raises more than ImportError (e.g. missing libmlx.so)
            return f"{type(e).__name__}: {e}"
    return None


def available() -> list[str]:
    """Every engine that imports here, peers included."""
    return [n for n in ENGINES if _probe(n) is None]


def auto() -> str:
    """MLX on Apple Silicon (when installed), torch everywhere else."""
    if is_apple_silicon() and _probe("mlx") is None:
        return "mlx"
    return "torch"


def get(name: str):
    """The Backend class of engine `name`."""
    if name not in ENGINES:
        raise UserError(f"unknown backend {name!r}; choose from {', '.join(ENGINES)}, auto, all")
    problem = _probe(name)
    if problem:
        raise EngineUnavailable(f"the {name} engine is not installed ({problem}); install it with: {INSTALL[name]}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def engine_names(choice: str) -> list[str]:
    """'mlx' | 'torch' | 'auto' | 'all' | 'mlx,torch' -> engine names to run, in order."""
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        return [auto()]
    if choice == "all":  # billion's own engines; a peer only when named
        found = [n for n in available() if n not in PEERS]
        if not found:
            raise EngineUnavailable("no engine is installed; " + "; ".join(INSTALL.values()))
        return found
    picked = [c.strip() for c in choice.split(",") if c.strip()]
    for c in picked:
        if c not in ENGINES:
            raise UserError(f"unknown backend {c!r}; choose from {', '.join(ENGINES)}, auto, all")
    return picked
