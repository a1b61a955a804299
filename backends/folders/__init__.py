"""Model folders on disk: HF folders read without loading (hf_folder), GGUF files converted to them
(gguf_folder), synthetic random:/tiny: folders (synthetic), layers:N drafts (draft_folder), LoRA adapters
in both engines' formats (adapters)."""

from __future__ import annotations

import os
from pathlib import Path


def billion_home() -> Path:
    """Where billion builds and caches what it makes (folders, converted files): $BILLION_HOME,
    else ~/.cache/billion."""
    return Path(os.environ.get("BILLION_HOME", Path.home() / ".cache" / "billion"))
