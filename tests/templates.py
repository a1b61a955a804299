"""Real published chat templates for the tool-format tests, fetched once from package registries
(pinned versions) and cached under ~/.cache/billion/templates; nothing of them is kept in git.

- llama.cpp keeps models' own templates in its models/templates/, and the llama-cpp-python source
  distribution (PyPI) ships that folder: Llama 3.2, Qwen2.5 and Mistral Nemo's.
- TinyLlama-1.1B-Chat-v1.0's is not there. Hugging Face's `@huggingface/ollama-utils` (npm) maps
  Ollama's models to the chat templates in their GGUF files (`src/chat-template-automap.ts`,
  generated from Ollama's library): its `library/tinyllama:1.1b` entry is the template TinyLlama's
  GGUF carries from its tokenizer_config.json (the same text llama-server reports for
  tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf, and Zephyr's, which TinyLlama reuses)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import pytest

VERSION = "0.3.36"
SOURCE = f"llama-cpp-python {VERSION} (sdist), vendor/llama.cpp/models/templates/"
FILES = {"llama-3.2": "meta-llama-Llama-3.2-3B-Instruct.jinja",  # the 1B-Instruct's template too
         "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",  # Qwen2.5-0.5B-Instruct's is the same
         "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja"}
CACHE = Path.home() / ".cache" / "billion" / "templates" / f"llama-cpp-python-{VERSION}"

NPM_PACKAGE = "https://registry.npmjs.org/@huggingface/ollama-utils/-/ollama-utils-0.0.18.tgz"
NPM_SHA1 = "1a33d36a0a9bee1c1e518c109bfaab893d08b953"  # the registry's shasum of that tarball
NPM_ENTRIES = {"tinyllama": "library/tinyllama:1.1b"}  # name -> the automap's Ollama model
NPM_CACHE = CACHE.parent / "ollama-utils-0.0.18"


def template(name: str) -> str:
    """The template's text (skips the test when the package cannot be fetched, e.g. offline)."""
    if name in NPM_ENTRIES:
        path = NPM_CACHE / f"{name}.jinja"
        if not path.exists():
            _fetch_npm()
        return path.read_text()
    path = CACHE / FILES[name]
    if not path.exists():
        _fetch()
    return path.read_text()


def _fetch_npm() -> None:
    try:
        with urllib.request.urlopen(NPM_PACKAGE, timeout=60) as answer:
            data = answer.read()
    except OSError as e:
        pytest.skip(f"cannot fetch {NPM_PACKAGE} for TinyLlama's chat template: {e}")
    assert hashlib.sha1(data).hexdigest() == NPM_SHA1, "the npm package is not the one pinned"
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        automap = archive.extractfile("package/src/chat-template-automap.ts").read().decode()
    NPM_CACHE.mkdir(parents=True, exist_ok=True)
    for name, model in NPM_ENTRIES.items():
        entry = automap[automap.index(f'model: "{model}"'):]
        text = json.loads(re.search(r'gguf: ("(?:[^"\\]|\\.)*")', entry).group(1))  # a JSON string in the TS source
        (NPM_CACHE / f"{name}.jinja").write_text(text)


def _fetch() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={VERSION}", "-d", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if run.returncode != 0 or not archives:
            pytest.skip(f"cannot fetch {SOURCE} for its chat templates: {run.stderr.strip()[-200:]}")
        CACHE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                if Path(member.name).name in FILES.values() and "/models/templates/" in member.name:
                    (CACHE / Path(member.name).name).write_bytes(archive.extractfile(member).read())
