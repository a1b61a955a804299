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
# name==version per wheel; mlx-cuda is optional (it is large: left out when the carry would pass 64 MiB)
WANT=(transformers==5.24.0 torchao==0.18.0 bitsandbytes==0.49.2)
MLX_WANT=(mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2)

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    mkdir -p "$WHEELS"
    get() {
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
            -d "$WHEELS" "$@"
    }
    get "${WANT[@]}" || exit 1
    get "${MLX_WANT[@]}" || echo "mlx's CUDA wheels did not download: the MLX step will be skipped"
    total=$(du -sm "$WHEELS" | cut -f1)
    if (( total > 60 )); then  # the whole carry is 64 MiB: MLX's CUDA build goes first
        echo "wheels are ${total} MiB: leaving MLX's CUDA build out"
        rm -f "$WHEELS"/mlx*.whl
    fi
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
if [[ $SMOKE == 1 ]]; then
    PY=.venv/bin/python
    DEVICE=cpu; MODELS=(tiny:tinyllama tiny:llama-3.2-1b); GEN=8; RUNS=1; PROMPT=16
else
    DEVICE=cuda; MODELS=(random:tinyllama random:llama-3.2-1b); GEN=128; RUNS=3; PROMPT=128
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
step() {  # step NAME SECONDS command...: run with a time limit, log its outcome, go on
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    local rc=$?
    local what="passed"
    (( rc == 124 )) && what="TIMED OUT"
    (( rc != 0 && rc != 124 )) && what="FAILED (exit $rc)"
    SUMMARY+=("$(printf '%-44s %-18s %4ds' "$name" "$what" $((SECONDS - start)))")
}
billion() { $PY -m billion "$@"; }

step "CUDA tests (tests/test_cuda.py, compiled)" 150 \
    $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_compiled.py -k "not engine_without"

for model in "${MODELS[@]}"; do
    step "bench $model bfloat16 eager" 60 \
        billion bench -b torch -m "$model" --device $DEVICE --dtype bfloat16 -p $PROMPT -n $GEN -r $RUNS
    step "bench $model bfloat16 --compile" 150 \
        billion bench -b torch -m "$model" --device $DEVICE --dtype bfloat16 -p $PROMPT -n $GEN -r $RUNS --compile
done

model=${MODELS[0]}
for scheme in int8 int4 bnb-int8 bnb-int4; do
    [[ $SMOKE == 1 && $scheme == bnb-* ]] && continue  # bitsandbytes is CUDA only
    step "bench $model -q $scheme" 60 \
        billion bench -b torch -m "$model" --device $DEVICE --dtype bfloat16 -q $scheme -p $PROMPT -n $GEN -r $RUNS
done

step "speculate ${MODELS[1]} --draft layers:4" 90 \
    billion speculate -b torch -t "${MODELS[1]}" --draft layers:4 --damp 0.1 --device $DEVICE --dtype bfloat16 \
    -n $GEN -r 2 --k 2,4

if [[ $SMOKE == 0 ]] && ls "$WHEELS"/mlx*.whl >/dev/null 2>&1; then
    step "install mlx[cuda] (carried wheels)" 60 \
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_mlx "$WHEELS"/mlx*.whl
    PYTHONPATH="$PYTHONPATH:/tmp/site_mlx" step "bench $model on MLX's CUDA build" 90 \
        billion bench -b mlx -m "$model" --device gpu --dtype bfloat16 -p $PROMPT -n $GEN -r $RUNS
else
    SUMMARY+=("$(printf '%-44s %-18s' "MLX's CUDA build" "not run (no wheels)")")
fi

echo; echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
n=$(ls "$RESULTS" | wc -l)
cp "$RESULTS"/*.json results/ 2>/dev/null
tar -czf "$OUT_DIR/results.tar.gz" -C "$RESULTS" . && echo "$n records in results/ and $OUT_DIR/results.tar.gz"
