"""What chunked prefill costs: a long prompt's time to first token, prefilled whole and in chunks.

The batch scheduler (backends/batching.py, billion serve --prefill-chunk) prefills at most a chunk of
a prompt per step. This times the first token of one --prompt-tokens prompt through a batch, whole
and at each chunk size, alone (no other row decoding, so the figure is the chunking's own cost),
interleaved over --runs rounds; medians.

    .venv/bin/python scripts/prefill_chunk_bench.py -b torch --prompt-tokens 1500 --chunks 128,256,512

Prints a table; writes no record.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from backends.types import GenerationConfig
from billion.loading import LoadOptions, resolve
from billion.runner import Runner


def first_token_s(backend, prompt: list[int], chunk: int | None) -> float:
    batch = backend.batch(max_batch=1, prompt_cache_size=0, prefill_chunk=chunk)
    batch.add(prompt, GenerationConfig(max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    while batch.busy:
        if any(e.token is not None for e in batch.step()):
            return time.perf_counter() - start
    raise RuntimeError("no token")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", default="gguf:smollm2-135m")
    p.add_argument("--backend", "-b", default="torch")
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--chunks", default="128,256,512")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    sizes = [None] + [int(c) for c in args.chunks.split(",")]
    runner = Runner("prefill_chunk_bench", resolve(args.model), LoadOptions(device="cpu", dtype="float32"))
    with runner.loaded(args.backend) as backend:
        prompt = np.random.default_rng(0).integers(0, backend.vocab_size, args.prompt_tokens).tolist()
        first_token_s(backend, prompt[:64], None)  # warm-up
        times: dict = {c: [] for c in sizes}
        for _ in range(args.runs):
            for c in sizes:
                times[c].append(first_token_s(backend, prompt, c))
    whole = statistics.median(times[None])
    print(f"{args.model} on {args.backend}, a {args.prompt_tokens}-token prompt, median of {args.runs}")
    for c in sizes:
        t = statistics.median(times[c])
        print(f"  {'whole' if c is None else f'chunks of {c}':<16} first token {t:7.3f} s  x{t / whole:.2f}"
              f"  ({args.prompt_tokens / t:6.0f} tok/s)")


if __name__ == "__main__":
    main()
