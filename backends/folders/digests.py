"""Content hashes of model files, each file read once per size and modification time.

A GGUF file keys its converted folder by its SHA-256, and a checkpoint's identity includes the
model folder's content hash; a 1B model is gigabytes, so a hash is remembered in
billion_home()/digests.json under (path, size, mtime) and recomputed only when the file changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from backends.folders import billion_home

# The files that make a folder what it is; caches, READMEs and the like do not change the model.
FOLDER_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt")


def _store() -> Path:
    return billion_home() / "digests.json"


def _read_store() -> dict:
    try:
        data = json.loads(_store().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent, or torn by a crash: it is only a cache
        return {}


def _write_store(data: dict) -> None:
    path = _store()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:  # a read-only home only costs a re-hash next time
        pass


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, from the cache when its size and mtime are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    store = _read_store()
    if key in store:
        return store[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    store = {k: v for k, v in _read_store().items() if not k.startswith(f"{path}|")}
    store[key] = h.hexdigest()
    _write_store(store)
    return store[key]


def folder_digest(folder: Path) -> str:
    """SHA-256 over the names and digests of a model folder's files (config, weights, tokenizer)."""
    h = hashlib.sha256()
    files = sorted({f for pattern in FOLDER_FILES for f in Path(folder).glob(pattern) if f.is_file()})
    for f in files:
        h.update(f"{f.name}\0{file_digest(f)}\n".encode())
    return h.hexdigest()
