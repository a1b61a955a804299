"""Where a batched decode step's time goes on the torch engine: B random 128-token prompts decoded
together by the one scheduler, the median step time, then torch's profiler over 20 steps (the
operators by their own CPU time). Prints only; nothing else should run on the machine.

    .venv/bin/python scripts/batch_step_profile.py -m gguf:smollm2-135m --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from torch.profiler import ProfilerActivity, profile

from backends.types import GenerationConfig
from billion.loading import LoadOptions, load, resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    backend = load("torch", resolve(args.model), LoadOptions())
    rng = np.random.default_rng(0)

    def filled(tokens: int):
        batch = backend.batch(max_batch=args.batch, prompt_cache_size=0)
        for _ in range(args.batch):
            batch.add(rng.integers(0, backend.vocab_size, args.prompt_tokens).tolist(),
                      GenerationConfig(max_tokens=tokens, ignore_eos=True))
        batch.step()  # every prompt in, the first decode done
        return batch

    batch, steps = filled(args.gen_tokens), []
    while batch.busy:
        start = time.perf_counter()
        batch.step()
        steps.append(time.perf_counter() - start)
    step = statistics.median(steps)
    print(f"batch {args.batch}: decode step median {step * 1e3:.1f} ms -> {args.batch / step:.1f} tok/s")
    batch = filled(40)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            batch.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
