"""Real published chat templates for the tool-format tests: llama.cpp keeps models' own templates in
its models/templates/, and the llama-cpp-python source distribution ships that folder. It is
fetched with pip once (a real package from the registry, pinned) and the templates the tests read
are cached under ~/.cache/billion/templates; nothing of it is kept in git."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

VERSION = "0.3.36"
SOURCE = f"llama-cpp-python {VERSION} (sdist), vendor/llama.cpp/models/templates/"
FILES = {"llama-3.2": "meta-llama-Llama-3.2-3B-Instruct.jinja",  # the 1B-Instruct's template too
         "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",  # Qwen2.5-0.5B-Instruct's is the same
         "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja"}
CACHE = Path.home() / ".cache" / "billion" / "templates" / f"llama-cpp-python-{VERSION}"


def template(name: str) -> str:
    """The template's text (skips the test when the package cannot be fetched, e.g. offline)."""
    path = CACHE / FILES[name]
    if not path.exists():
        _fetch()
    return path.read_text()


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
