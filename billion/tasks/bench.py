"""Speed and memory of one loaded model: prefill, time to first token, decode.

Prompts are seeded random token ids and EOS is ignored, so every engine does
exactly the same work (as mlx_lm.benchmark does). Each token is timed when the
engine hands it over, after the device computed it: time to first token covers
prefill plus the first sample, decode covers the tokens after it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np

from backends.base import Backend
from backends.speculation import NgramDraft
from backends.types import GenerationConfig
from billion.tasks.timing import TimedStream

GB = 1e9


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 128
    gen_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    seed: int = 0
    num_draft: int = 4


@dataclass
class RunTiming:
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    tokens: list[int]
    from_draft: int = 0


@dataclass
class BenchResult:
    config: BenchConfig
    runs: list[RunTiming] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def random_prompt(vocab_size: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab_size, n).tolist()


def time_generation(backend: Backend, prompt: list[int], gen: GenerationConfig, *,
                    draft: Backend | NgramDraft | None = None, num_draft: int = 4) -> RunTiming:
    run = TimedStream(backend.stream(prompt, gen, draft=draft, num_draft=num_draft)).consume()
    return RunTiming(run.ttft_s, len(prompt) / run.ttft_s, run.decode_tps, run.tokens, run.from_draft)


def warmup_config(backend: Backend, gen_tokens: int) -> GenerationConfig:
    """A short warm-up generation; as long as the timed runs where the decode is compiled, which
    would otherwise meet a new cache length (and compile again) inside a timed run."""
    return GenerationConfig(max_tokens=gen_tokens if backend.compiled else min(gen_tokens, 8), temperature=0.0,
                            ignore_eos=True)


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_bench(backend: Backend, cfg: BenchConfig, *, draft: Backend | NgramDraft | None = None,
              on_run=None, result: BenchResult | None = None) -> BenchResult:
    """Warm up, then time cfg.runs generations, each appended to the result as it finishes (so a
    caller that passes `result` keeps the runs already timed if Ctrl-C stops it); the metrics
    are summarise()'s."""
    backend.check_fits(cfg.prompt_tokens, cfg.gen_tokens)
    prompt = random_prompt(backend.vocab_size, cfg.prompt_tokens, cfg.seed)
    gen = GenerationConfig(max_tokens=cfg.gen_tokens, temperature=0.0, ignore_eos=True)
    result = result or BenchResult(cfg)
    for i in range(cfg.warmup):
        time_generation(backend, prompt, warmup_config(backend, cfg.gen_tokens), draft=draft, num_draft=cfg.num_draft)
        if on_run:
            on_run("warmup", i + 1, None)
    backend.reset_peak_memory()
    for i in range(cfg.runs):
        run = time_generation(backend, prompt, gen, draft=draft, num_draft=cfg.num_draft)
        result.runs.append(run)
        if on_run:
            on_run("run", i + 1, run)
    result.metrics = summarise(backend, result)
    return result


def summarise(backend: Backend, result: BenchResult) -> dict:
    info = backend.info()
    mem = backend.memory()
    bandwidth, bw_source = backend.memory_bandwidth()
    metrics = {
        "runs_completed": len(result.runs),
        "weight_gb": info.weight_bytes / GB,
        "decode_gb_per_token": info.decode_bytes_per_token / GB,
        "peak_memory_gb": mem.peak_bytes / GB if mem.peak_bytes is not None else None,
        "memory_source": mem.source,
        "bandwidth_gbs": bandwidth,
        "bandwidth_source": bw_source,
        "parameters": info.parameters,
    }
    if result.runs:
        for key in ("prefill_tps", "ttft_s", "decode_tps"):
            spread = _spread([getattr(r, key) for r in result.runs])
            metrics[key] = spread["median"]
            metrics[f"{key}_min"], metrics[f"{key}_max"] = spread["min"], spread["max"]
        drafted = sum(r.from_draft for r in result.runs)
        if bandwidth:
            ceiling = bandwidth * GB / info.decode_bytes_per_token
            metrics["bandwidth_ceiling_tps"] = ceiling
            if metrics["decode_tps"] > ceiling and not drafted:  # a draft may beat it: tokens without reads
                # A ceiling that a measurement exceeds is not a ceiling: the probe was wrong
                # (slowed by other work), so no fraction is reported.
                metrics["bandwidth_fault"] = (
                    f"decode read {metrics['decode_tps'] * info.decode_bytes_per_token / GB:.1f} GB/s, above the "
                    f"measured bandwidth of {bandwidth:.1f} GB/s: the bandwidth probe was wrong")
            else:
                metrics["bandwidth_fraction"] = metrics["decode_tps"] / ceiling
        if drafted:
            metrics["tokens_from_draft_share"] = drafted / sum(len(r.tokens) for r in result.runs)
    return metrics
