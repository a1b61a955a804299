#!/usr/bin/env bash
# The CUDA check, in one go on a GPU machine (about 8 minutes on an H200): the CUDA tests, then
# records with the GPU named in them -- eager against compiled torch bfloat16 on random:tinyllama
# and random:llama-3.2-1b, torchao int8/int4 and bitsandbytes int8/NF4, speculative decoding, and
# MLX's CUDA build when its wheels came along.
#
# That machine reaches no registry and has its own Python 3.12 with torch 2.11 and transformers
# 5.17, older than billion needs (forward(cache=...) is 5.24). So, first, where pip works:
#
#     bash scripts/device_check.sh --prepare     # wheels for Python 3.12 into .whl/ (git-ignored)
#
# then there, from the repository root, with .whl carried along (the device tool: carry [".whl"]):
#
#     bash scripts/device_check.sh               # OUT=<folder> also gets results.tar.gz and the log
#
# The machine's own torch is kept (a CUDA build cannot travel in 64 MiB); the wheels go to
# /tmp/site ahead of it on PYTHONPATH. Each step has its own time limit, and a failing step is
# logged and the next one runs: the summary at the end says which passed.
#
#     bash scripts/device_check.sh --smoke       # the same steps on this CPU with tiny models: the plumbing
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
WANT=(transformers==5.24.0 torchao==0.18.0 bitsandbytes==0.49.2)
# MLX's CUDA build (mlx + mlx-cuda-13) does not fit: its wheel alone is 86 MiB. The MLX step runs
# only where its wheels are in .whl/ (a larger carry than this workplace's 64 MiB).

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    mkdir -p "$WHEELS"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${WANT[@]}" || exit 1
    # bitsandbytes ships a library per CUDA release (58 MiB in all): keep the CUDA 13 one, which the
    # machine's torch (cu130) loads, and the CPU one, so that everything travels in one carry
    python3 - "$WHEELS"/bitsandbytes-*.whl <<'EOF'
import re, sys, zipfile
from pathlib import Path

path = Path(sys.argv[1])
slim = path.with_suffix(".slim")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if not re.search(r"libbitsandbytes_(cuda(?!130)|rocm|xpu)", item.filename):
            dst.writestr(item, src.read(item))
slim.replace(path)
EOF
    ls -la "$WHEELS"; du -sh "$WHEELS"
    exit 0
fi

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT_DIR=${OUT:-/tmp/device_check_out}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/device_check.log"
RESULTS=$(mktemp -d)  # this run's records only, then copied into results/ and packed for $OUT
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false BILLION_RESULTS="$RESULTS"
export BILLION_HOME=${BILLION_HOME:-/tmp/billion_home}

PY=python3
BUDGET=${DEVICE_CHECK_SECONDS:-540}  # the device tool runs one command for 600 s at most
if [[ $SMOKE == 1 ]]; then
    PY=.venv/bin/python
    DEVICE=cpu; MODELS=(tiny:tinyllama tiny:llama-3.2-1b); GEN=8; RUNS=1; PROMPT=16; DRAFT=layers:1
else
    DEVICE=cuda; MODELS=(random:tinyllama random:llama-3.2-1b); GEN=128; RUNS=3; PROMPT=128; DRAFT=layers:4
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        ls "$WHEELS"/*.whl | grep -v '/mlx' | xargs $PY -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target /tmp/site || echo "FAILED: installing the carried wheels"
        export PYTHONPATH=/tmp/site
    else
        echo "no $WHEELS/ here: using this machine's packages as they are (bash scripts/device_check.sh --prepare)"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
$PY - <<'EOF'
import torch, transformers
print(f"python torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF

declare -a SUMMARY
step() {  # step NAME SECONDS command...: run within its limit and the budget left, log the outcome, go on
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - SECONDS))
    if (( left < 20 )); then
        SUMMARY+=("$(printf '%-46s %-18s' "$name" "not run (budget)")"); return
    fi
    (( limit > left )) && limit=$left
    echo; echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    local what="passed"
    (( rc == 124 )) && what="TIMED OUT"
    (( rc != 0 && rc != 124 )) && what="FAILED (exit $rc)"
    SUMMARY+=("$(printf '%-46s %-18s %4ds' "$name" "$what" $((SECONDS - start)))")
}
BILLION=($PY -m billion)
BENCH=("${BILLION[@]}" bench -b torch --device $DEVICE --dtype bfloat16 -p $PROMPT -n $GEN -r $RUNS)

# in order of what matters most, so that a short budget still covers the first
step "CUDA tests (tests/test_cuda.py, compiled)" 150 \
    $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_compiled.py -k "not engine_without"
step "bench ${MODELS[0]} bfloat16 eager" 60 "${BENCH[@]}" -m "${MODELS[0]}"
step "bench ${MODELS[0]} bfloat16 --compile" 150 "${BENCH[@]}" -m "${MODELS[0]}" --compile
for scheme in int4 bnb-int4 int8 bnb-int8; do
    [[ $SMOKE == 1 && $scheme == bnb-* ]] && continue  # bitsandbytes is CUDA only
    step "bench ${MODELS[0]} -q $scheme" 45 "${BENCH[@]}" -m "${MODELS[0]}" -q $scheme
done
step "speculate ${MODELS[1]} --draft $DRAFT" 60 \
    "${BILLION[@]}" speculate -b torch -t "${MODELS[1]}" --draft $DRAFT --damp 0.1 --device $DEVICE --dtype bfloat16 \
    -n $GEN -r 2 --k 2,4
step "bench ${MODELS[1]} bfloat16 eager" 60 "${BENCH[@]}" -m "${MODELS[1]}"
step "bench ${MODELS[1]} bfloat16 --compile" 150 "${BENCH[@]}" -m "${MODELS[1]}" --compile

if [[ $SMOKE == 0 ]] && ls "$WHEELS"/mlx*.whl >/dev/null 2>&1; then
    step "install mlx[cuda] (carried wheels)" 60 \
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_mlx "$WHEELS"/mlx*.whl
    PYTHONPATH="$PYTHONPATH:/tmp/site_mlx" step "bench ${MODELS[0]} on MLX's CUDA build" 90 \
        "${BILLION[@]}" bench -b mlx -m "${MODELS[0]}" --device gpu --dtype bfloat16 -p $PROMPT -n $GEN -r $RUNS
else
    SUMMARY+=("$(printf '%-46s %-18s' "MLX's CUDA build" "not run (its wheels are not here)")")
fi

echo; echo "=== summary ($SECONDS s)"
printf '%s\n' "${SUMMARY[@]}"
tar -czf "$OUT_DIR/results.tar.gz" -C "$RESULTS" .
if [[ $SMOKE == 1 ]]; then
    echo "$(ls "$RESULTS" | wc -l) records in $OUT_DIR/results.tar.gz (smoke: not copied into results/)"
else
    cp "$RESULTS"/*.json results/ 2>/dev/null
    echo "$(ls "$RESULTS" | wc -l) records in results/ and $OUT_DIR/results.tar.gz"
fi
