"""Throughput against batch size: B sequences decoded together by the engine's batch generator.

For each batch size B: B seeded random prompts of cfg.prompt_tokens (a different seed each, so no
row shares a prefix with another and the prompt cache finds nothing), each generating
cfg.gen_tokens greedily with EOS ignored, all added at once. Timed from the moment they are added:
TTFT is when a sequence's first token exists (its own prefill, queued behind the ones before it),
prefill tok/s is B * prompt tokens over the time until the last first token, aggregate decode
tok/s is every token after the first ones over the time from the last first token to the end, and
per-sequence decode tok/s is that divided by B. Medians over cfg.runs after cfg.warmup.

With a prompt-lookup draft (`draft`, a speculation.NgramDraft) every row drafts from its own text
and the batch verifies all rows' proposals in one pass; such runs use prompts with repetition in
them (a random block of REPEAT_BLOCK tokens, repeated), which is where prompt lookup pays, and
the plain runs they are compared with use the same prompts (`repetitive`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from backends.base import Backend
from backends.types import GenerationConfig
from billion.tasks.bench import GB, BenchConfig, random_prompt

REPEAT_BLOCK = 16  # tokens in the block a repetitive prompt repeats


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
    drafted: int = 0  # prompt lookup: proposals made and accepted over the timed runs
    accepted: int = 0


def prompt(vocab_size: int, n: int, seed: int, repetitive: bool) -> list[int]:
    if not repetitive:
        return random_prompt(vocab_size, n, seed)
    block = random_prompt(vocab_size, REPEAT_BLOCK, seed)
    return (block * (n // REPEAT_BLOCK + 1))[:n]


def time_batch(backend: Backend, cfg: BenchConfig, batch_size: int, seed: int, draft=None,
               repetitive: bool = False, result: BatchBenchResult | None = None) -> BatchRun:
    gen = GenerationConfig(max_tokens=cfg.gen_tokens, temperature=0.0, ignore_eos=True)
    batch = backend.batch(max_batch=batch_size, prompt_cache_size=0, draft=draft, num_draft=cfg.num_draft)
    start = time.perf_counter()
    for row in range(batch_size):
        batch.add(prompt(backend.vocab_size, cfg.prompt_tokens, seed + row, repetitive), gen)
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
    if result is not None and batch.stats is not None:
        result.drafted += batch.stats.drafted
        result.accepted += batch.stats.accepted
    return BatchRun(statistics.median(t - start for t in first.values()),
                    batch_size * cfg.prompt_tokens / (prefill_end - start),
                    decoded / (last_event - prefill_end) if last_event > prefill_end else float("nan"), tokens)


def run_batch_bench(backend: Backend, cfg: BenchConfig, batch_size: int, *, on_run=None, draft=None,
                    repetitive: bool = False, result: BatchBenchResult | None = None) -> BatchBenchResult:
    """Warm up, then time cfg.runs batches of `batch_size`, each into the result as it ends."""
    backend.check_fits(cfg.prompt_tokens, cfg.gen_tokens)
    result = result or BatchBenchResult(batch_size)
    small = BenchConfig(prompt_tokens=cfg.prompt_tokens, gen_tokens=min(cfg.gen_tokens, 8), num_draft=cfg.num_draft)
    for _ in range(cfg.warmup):
        time_batch(backend, small, batch_size, cfg.seed, draft, repetitive)
    backend.reset_peak_memory()
    for i in range(cfg.runs):
        result.runs.append(time_batch(backend, cfg, batch_size, cfg.seed + 1000 * i, draft, repetitive, result))
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
    if result.drafted:
        metrics["draft_acceptance"] = result.accepted / result.drafted
    return metrics
