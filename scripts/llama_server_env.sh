# Sourced by the scripts that put billion serve beside llama.cpp's llama-server (load_four_servers.sh,
# serve_vs_llama_server.sh), from the repository root: MODEL (BILLION_MODEL, default
# gguf:smollm2-135m), the llama-server binary SERVER (LLAMA_SERVER, default
# $BILLION_HOME/llama.cpp-<version>/bin/llama-server), the folder billion serves (FOLDER) and
# llama.cpp's own F32 conversion of it (GGUF, cached as the llama.cpp peer engine makes it).
MODEL=${BILLION_MODEL:-gguf:smollm2-135m}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
TOOLS=${BILLION_HOME:-$HOME/.cache/billion}/llama.cpp-$VERSION
SERVER=${LLAMA_SERVER:-$TOOLS/bin/llama-server}
PY=.venv/bin/python
[ -x "$SERVER" ] || { echo "no llama-server at $SERVER: run bash scripts/setup_llamacpp.sh --tools"; exit 1; }
FOLDER=$("$PY" -c "from billion.loading import resolve; print(resolve('$MODEL', progress=False).folder)")
GGUF=$("$PY" -c "from backends.llamacpp_engine.convert import gguf_file; from pathlib import Path; \
print(gguf_file(Path('$FOLDER'), '$VERSION', 'float32', None))")
