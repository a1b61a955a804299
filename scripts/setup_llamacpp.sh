#!/usr/bin/env bash
# The llama.cpp peer engine (-b llama.cpp; optional, never part of the tests' default path):
#  1. llama-cpp-python built from its source distribution into .venv. There is no prebuilt
#     wheel for Linux here: the build takes about 10 minutes on 2 cores. The wheel is kept in
#     $BILLION_HOME/wheels, so installing it again (a new venv) takes seconds.
#  2. llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and its
#     own gguf-py), which only the source distribution carries, unpacked to
#     $BILLION_HOME/llama.cpp-<version>, where the engine looks for it.
#  3. With --tools: llama.cpp's own llama-server, llama-bench, llama-batched-bench and
#     test-backend-ops, built with cmake from the same source distribution into
#     $BILLION_HOME/llama.cpp-<version>/bin (another ~10 minutes), for the comparisons
#     (docs/llamacpp.md): the peer's server with parallel slots, its decode speed alone and
#     batched, beside billion serve, billion bench and bench --batch, and its matmul kernels'
#     GB/s per shape beside torch's (scripts/cpu_matmul_probe.py --llama-cpp).
# On macOS pip builds it with Metal; for CUDA set CMAKE_ARGS="-DGGML_CUDA=on" first.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
HOME_DIR=${BILLION_HOME:-$HOME/.cache/billion}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run scripts/setup.sh first (no .venv)"; exit 1; }
mkdir -p "$HOME_DIR/wheels"
sdist="$HOME_DIR/wheels/llama_cpp_python-$VERSION.tar.gz"
[ -f "$sdist" ] || "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$HOME_DIR/wheels"
if ! ls "$HOME_DIR/wheels/llama_cpp_python-$VERSION-"*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION from source (about 10 minutes on 2 cores)..."
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PY" -m pip wheel -q --no-deps "$sdist" -w "$HOME_DIR/wheels"
fi
"$PY" -m pip install -q "$HOME_DIR/wheels/llama_cpp_python-$VERSION-"*.whl
tools="$HOME_DIR/llama.cpp-$VERSION"
if [ ! -f "$tools/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d)
  top="llama_cpp_python-$VERSION/vendor/llama.cpp"
  tar xzf "$sdist" -C "$tmp" "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
  rm -rf "$tools" && mv "$tmp/$top" "$tools" && rm -rf "$tmp"
fi
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed; converter in $tools')"
TOOLS="llama-server llama-bench llama-batched-bench test-backend-ops"
missing=$(for t in $TOOLS; do [ -x "$tools/bin/$t" ] || echo "$t"; done)
if [ "${1:-}" = "--tools" ] && [ -n "$missing" ]; then
  echo "building $(echo $missing) (about 10 minutes on 2 cores)..."
  src=$(mktemp -d)
  tar xzf "$sdist" -C "$src" "llama_cpp_python-$VERSION/vendor/llama.cpp"
  llama="$src/llama_cpp_python-$VERSION/vendor/llama.cpp"
  cmake -S "$llama" -B "$llama/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$llama/build" -j "$(nproc)" --target $missing >/dev/null
  mkdir -p "$tools/bin" && for t in $missing; do cp "$llama/build/bin/$t" "$tools/bin/"; done
  rm -rf "$src"
  echo "$(echo $missing) in $tools/bin"
fi
