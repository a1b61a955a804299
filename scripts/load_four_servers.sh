#!/usr/bin/env bash
# The load benchmark's chart on one set of weights: billion serve (torch and MLX, one process, -b
# all), llama.cpp's llama-server and mlx-lm's mlx_lm.server, all on 127.0.0.1, loaded by one
# `billion load` run, which sends each concurrency point's requests to each server in turn.
#   bash scripts/setup_llamacpp.sh --tools         # once: llama-server and llama.cpp's converter
#   bash scripts/load_four_servers.sh [CONCURRENCY] [REQUESTS]    # default 1,2,4,8 and 8
# Servers idle while another is loaded. The GGUF llama-server loads is llama.cpp's own F32
# conversion of the folder billion serves (gguf:smollm2-135m, dequantized); mlx_lm.server loads
# that folder as it is, in float32 on this CPU (MLX's CPU build). mlx_lm.server knows no
# ignore_eos, so its replies may end early at EOS: the record's output tokens say how many came.
# Records: serve_bench, one per server and point, then `billion report` draws the chart.
set -euo pipefail
cd "$(dirname "$0")/.."
CONC=${1:-1,2,4,8}
REQUESTS=${2:-8}
source scripts/llama_server_env.sh  # MODEL, SERVER, FOLDER, GGUF

wait_up() { for _ in $(seq 1 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 1; done; echo "$1 did not come up"; return 1; }
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
.venv/bin/billion serve -m "$MODEL" -b all --port 8281 --parallel 8 --log-level warning >/tmp/billion-serve.log 2>&1 &
pids+=($!)
"$SERVER" -m "$GGUF" --host 127.0.0.1 --port 8282 -np 8 -c 4096 -t "$(nproc)" >/tmp/llama-server.log 2>&1 &
pids+=($!)
.venv/bin/mlx_lm.server --model "$FOLDER" --host 127.0.0.1 --port 8283 >/tmp/mlx-lm-server.log 2>&1 &
pids+=($!)
wait_up http://127.0.0.1:8281/health && wait_up http://127.0.0.1:8282/health && wait_up http://127.0.0.1:8283/v1/models

.venv/bin/billion load "billion-torch=http://127.0.0.1:8281#$MODEL@torch" "billion-mlx=http://127.0.0.1:8281#$MODEL@mlx" \
  "llama-server=http://127.0.0.1:8282" "mlx_lm.server=http://127.0.0.1:8283#$FOLDER" \
  -c "$CONC" --requests "$REQUESTS" --prompt-len 16 --output-len 32
