"""Throughput against batch size: B sequences decoded together by the engine's batch generator.

For each batch size B: B seeded random prompts of cfg.prompt_tokens (a different seed each, so no
row shares a prefix with another and the prompt cache finds nothing), each generating
cfg.gen_tokens greedily with EOS ignored, all added at once. Timed from the moment they are added:
TTFT is when a sequence's first token exists (its own prefill, queued behind the ones before it),
prefill tok/s is B * prompt tokens over the time until the last first token, aggregate decode
tok/s is every token after the first ones over the time from the last first token to the end, and
per-sequence decode tok/s is that divided by B. Medians over cfg.runs after cfg.warmup.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from backends.base import Backend
from backends.types import GenerationConfig
from billion.tasks.bench import GB, BenchConfig, random_prompt


@dataclass
class BatchRun:
    ttft_s: float  # median over the batch's sequences
    prefill_tps: float
    decode_tps: float  # aggregate: every sequence's tokens after its first
    tokens: int


@dataclass
class BatchBenchResult:
    batch_size: int
    runs: list[BatchRun] = field(default_factory=list)


def time_batch(backend: Backend, cfg: BenchConfig, batch_size: int, seed: int) -> BatchRun:
    gen = GenerationConfig(max_tokens=cfg.gen_tokens, temperature=0.0, ignore_eos=True)
    batch = backend.batch(max_batch=batch_size, prompt_cache_size=0)
    start = time.perf_counter()
    for row in range(batch_size):
        batch.add(random_prompt(backend.vocab_size, cfg.prompt_tokens, seed + row), gen)
    first, last_event, tokens = {}, start, 0
    while batch.busy:
        for e in batch.step():
            if e.token is None:
                continue
            tokens += 1
            first.setdefault(e.uid, e.time_s)
            last_event = e.time_s
    prefill_end = max(first.values())
    decoded = tokens - batch_size
    return BatchRun(statistics.median(t - start for t in first.values()),
                    batch_size * cfg.prompt_tokens / (prefill_end - start),
                    decoded / (last_event - prefill_end) if last_event > prefill_end else float("nan"), tokens)


def run_batch_bench(backend: Backend, cfg: BenchConfig, batch_size: int, *, on_run=None,
                    result: BatchBenchResult | None = None) -> BatchBenchResult:
    """Warm up, then time cfg.runs batches of `batch_size`, each into the result as it ends."""
    backend.check_fits(cfg.prompt_tokens, cfg.gen_tokens)
    result = result or BatchBenchResult(batch_size)
    small = BenchConfig(prompt_tokens=cfg.prompt_tokens, gen_tokens=min(cfg.gen_tokens, 8))
    for _ in range(cfg.warmup):
        time_batch(backend, small, batch_size, cfg.seed)
    backend.reset_peak_memory()
    for i in range(cfg.runs):
        result.runs.append(time_batch(backend, cfg, batch_size, cfg.seed + 1000 * i))
        if on_run:
            on_run(i + 1, result.runs[-1])
    return result


def summarise(backend: Backend, result: BatchBenchResult) -> dict:
    mem = backend.memory()
    metrics = {"batch_size": result.batch_size, "runs_completed": len(result.runs),
               "peak_memory_gb": mem.peak_bytes / GB if mem.peak_bytes is not None else None,
               "memory_source": mem.source}
    if result.runs:
        for key in ("ttft_s", "prefill_tps", "decode_tps"):
            values = [getattr(r, key) for r in result.runs]
            metrics[key if key != "decode_tps" else "aggregate_decode_tps"] = statistics.median(values)
        metrics["aggregate_decode_tps_min"] = min(r.decode_tps for r in result.runs)
        metrics["aggregate_decode_tps_max"] = max(r.decode_tps for r in result.runs)
        metrics["per_sequence_decode_tps"] = metrics["aggregate_decode_tps"] / result.batch_size
    return metrics
