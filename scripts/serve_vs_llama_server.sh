#!/usr/bin/env bash
# billion serve -b torch against llama.cpp's own llama-server on the same weights, 1 and 8 streaming
# clients (`billion load -c 1,8`: 8 streamed requests of 64 tokens, greedy, EOS ignored, per client
# count), REPS rounds on each server, one server at a time, on 127.0.0.1 only.
#   bash scripts/setup_llamacpp.sh --tools        # once: llama-server (and the HF -> GGUF converter)
#   bash scripts/serve_vs_llama_server.sh [REPS]   # default 3
# The GGUF llama-server loads is converted by llama.cpp's converter from the same folder billion
# serves (gguf:smollm2-135m dequantized), in F32: the same weights, the same precision.
# Records: serve_bench, one per server, client count and round (NAME=URL names the server). Environment: BILLION_MODEL
# (default gguf:smollm2-135m), LLAMA_SERVER (default $BILLION_HOME/llama.cpp-<version>/bin/llama-server).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
source scripts/llama_server_env.sh  # MODEL, SERVER, FOLDER, GGUF

wait_up() { for _ in $(seq 1 120); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 1; done; return 1; }
load() {  # url server-label [model id]
  local target="$2=$1${3:+#$3}"
  .venv/bin/billion load "$target" -c 2 --requests 2 --output-len 8 --results-dir "$(mktemp -d)" \
    >/dev/null || true  # warm-up, not recorded
  for _ in $(seq 1 "$REPS"); do
    # failed requests are counted in the record (requests_failed); go on
    .venv/bin/billion load "$target" -c 1,8 --requests 8 --prompt-len 7 --output-len 64 || true
  done
}

.venv/bin/billion serve -m "$MODEL" -b torch --port 8181 --parallel 8 --log-level warning >/tmp/billion-serve.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:8181 && load http://127.0.0.1:8181 "billion-torch" "$MODEL@torch"
kill $pid; wait $pid 2>/dev/null || true

# 8 slots of 512 tokens each (llama-server divides -c among its slots), 2 threads as torch uses
"$SERVER" -m "$GGUF" --host 127.0.0.1 --port 8182 -np 8 -c 4096 -t "$(nproc)" >/tmp/llama-server.log 2>&1 &
pid=$!
wait_up http://127.0.0.1:8182 && load http://127.0.0.1:8182 "llama-server"
