"""Speculative decoding as a measured task: pair checks, interleaved timing, theory.

What it measures: on one engine, in the same run and interleaved run by run,
the decode speed (tokens/s after the first token, prefill excluded) of the
target alone, the draft alone and speculative decoding for each k, on the
same prompt and chat template, and the acceptance statistics of every k
(backends.speculation.SpeculationStats: acceptance = accepted / drafted).
A prompt-lookup draft (`ngram[:N]`) has no model to time alone: its cost is
the measured time of its lookups, replayed on each run's own tokens.

Theory (Leviathan et al. 2023, section 3.4): with a per-token acceptance
probability alpha, k drafted tokens per round and a draft costing c target
steps per token, a round yields E = (1 - alpha^(k+1)) / (1 - alpha) tokens
and costs k*c + 1 target steps, so speedup = E / (k*c + 1). The paper's alpha
is a per-token probability, not accepted/drafted: its estimate from the same
counts is accepted / (accepted + rejections) (each drafted token is a trial
until the first rejection). The "1" assumes verifying k+1 tokens costs one
target step, which is true on a bandwidth-bound device; on a compute-bound
CPU it is not, so a second prediction uses the measured cost v_k of a k+1
token target pass and the measured tokens per round: E_measured / (k*c + v_k).
measured / that prediction is the implementation's efficiency.

For prompt lookup, c is the lookup's time in target steps spread over the k
tokens it may propose (one search per round, whatever it finds), and the
measured prediction also counts the rounds that found no match: each is one
target step that yields one token. Leviathan's E assumes every round drafts
k tokens, so with many such rounds it overestimates.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from backends.base import Backend
from backends.types import GenerationConfig, UserError
from backends.speculation import NgramDraft, NgramProposer, SpeculationStats
from billion.tasks.timing import TimedStream
from billion.loading import ResolvedModel, billion_home, derived, resolve_spec
from billion.models import MODELS, ModelSpec, parse_spec

LAYER_DRAFT = re.compile(r"^layers:(\d+)$")
NGRAM_DRAFT = re.compile(r"^ngram(?::(\d+))?$")
DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."


# ---------------------------------------------------------------- the pair, before loading


@dataclass(frozen=True)
class Pair:
    target: ResolvedModel
    draft: ResolvedModel | NgramDraft  # a draft model, or prompt lookup (no model, no folder)
    target_label: str
    draft_label: str


def ngram_draft(draft: str) -> NgramDraft | None:
    """`ngram` or `ngram:N` (prompt lookup with n-grams of up to N tokens) as an NgramDraft, else None."""
    m = NGRAM_DRAFT.match(draft)
    return NgramDraft(int(m.group(1) or NgramDraft.max_ngram)) if m else None


def draft_name(draft: str | None) -> str | None:
    """A --draft value as records name it: `ngram` spelled out as `ngram:N`, so N is always on record."""
    ngram = ngram_draft(draft) if draft else None
    return str(ngram) if ngram else draft


def _derived_path(folder: Path, tag: str) -> Path:
    """Where a folder derived from `folder` is cached (user folders get a hash of their path)."""
    models = billion_home() / "models"
    if folder.parent == models:
        return models / f"{folder.name}-{tag}"
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]
    return models / f"{folder.name}-{digest}-{tag}"


def compatible_pairs(target: ModelSpec) -> str:
    """Suggestions for a draft that shares the target's vocabulary."""
    if target.kind in ("random", "tiny"):
        return (f"use --draft layers:N (the target's own first N layers), --draft ngram (prompt lookup), or "
                f"another {target.kind}:{target.card.alias} folder: synthetic folders share a tokenizer within a "
                f"family only")
    hub_id = (target.hub_id or "").lower()
    drafts = [c.alias for c in MODELS.values() if hub_id in (t.lower() for t in c.drafts_for)]
    if drafts:
        return f"drafts known to share {target.text}'s vocabulary: {', '.join(drafts)}"
    # one line: each draft with its first target (`billion models` lists them all)
    pairs = ", ".join(f"{c.alias} -> {c.drafts_for[0].split('/')[-1]}" for c in MODELS.values() if c.drafts_for)
    return f"compatible pairs: {pairs} (more: billion models), or --draft layers:N|ngram"


def known_mismatch(target: ModelSpec, draft: ModelSpec) -> str | None:
    """Why the registry alone says two specs cannot share a vocabulary (checked before anything is
    built or downloaded), or None when only their folders can tell."""
    synthetic = ("random", "tiny")
    if target.kind in synthetic and draft.kind in synthetic:
        # synthetic folders share a tokenizer within one family, and a vocabulary size within one kind
        if (target.kind, target.card.family) != (draft.kind, draft.card.family):
            return "synthetic folders of different families or sizes have different vocabularies"
    elif "folder" not in (target.kind, draft.kind) and (target.kind in synthetic) != (draft.kind in synthetic):
        return "a synthetic tokenizer matches no real one"
    elif target.card and draft.card and target.card.tokenizer != draft.card.tokenizer:
        return "different tokenizers"  # billion models names them: the line stays short
    return None


def check_vocabularies(target: ModelSpec, draft_folder: Path, target_folder: Path, draft_label: str) -> None:
    """Same vocabulary size and the same token string for every id, else a UserError."""
    from backends.folders import hf_folder
    from backends.folders.draft_folder import tokenizer_vocabulary

    refuse = f"{draft_label} cannot draft for {target.text}"
    sizes = [int(hf_folder.read_config(f).get("vocab_size") or 0) for f in (target_folder, draft_folder)]
    if sizes[0] != sizes[1]:
        raise UserError(f"{refuse}: vocabulary sizes differ ({sizes[1]:,} vs {sizes[0]:,}); "
                        f"{compatible_pairs(target)}")
    vt, vd = tokenizer_vocabulary(target_folder), tokenizer_vocabulary(draft_folder)
    if vt != vd:
        by_id_t, by_id_d = ({i: s for s, i in v.items()} for v in (vt, vd))
        differ = sorted(i for i in set(by_id_t) | set(by_id_d) if by_id_t.get(i) != by_id_d.get(i))
        i = differ[0]
        raise UserError(f"{refuse}: their tokenizers differ on {len(differ):,} token ids (e.g. id {i}: "
                        f"{by_id_d.get(i)!r} vs {by_id_t.get(i)!r}); {compatible_pairs(target)}")


def prepare_pair(target: str, draft: str, damp: float | None = None) -> Pair:
    """The target and the draft resolved, checked to share a vocabulary before either is loaded:
    the edge where a two-model command turns both specs into models, each once.

    `draft` is a model spec, `layers:N` (the target's first N layers, final
    norm and head) or `ngram[:N]` (prompt lookup: no draft model, no folder).
    `damp` (synthetic targets with a layers:N draft only) scales the output
    projections of the layers the draft lacks, in a copy of the target: see
    backends/folders/draft_folder.py for why, and say so with the results.
    The registry's own knowledge refuses a mismatched pair before anything is built or downloaded.
    """
    from backends.folders.draft_folder import write_damped_target, write_layer_draft

    target_spec = parse_spec(target)
    layers, ngram = LAYER_DRAFT.match(draft), ngram_draft(draft)
    if damp is not None:
        if target_spec.kind not in ("random", "tiny") or not layers:
            raise UserError("--damp is for random: (or tiny:) targets with a layers:N draft only (it rewrites "
                            "weights; on a real model it would change the model)")
        if not 0 < damp < 1:
            raise UserError(f"--damp must be between 0 and 1 (got {damp})")
    if ngram:  # it proposes the target's own tokens: nothing to build or check
        return Pair(resolve_spec(target_spec), ngram, target, str(ngram))
    draft_spec = None if layers else parse_spec(draft)
    if draft_spec and (reason := known_mismatch(target_spec, draft_spec)):
        raise UserError(f"{draft} cannot draft for {target}: {reason}; {compatible_pairs(target_spec)}")
    model = resolve_spec(target_spec)
    if layers:
        n = int(layers.group(1))
        draft_label = f"{target} first {n} layers"
        draft_model = derived(write_layer_draft(model.folder, _derived_path(model.folder, f"layers{n}"), n),
                              draft_label)
    else:
        draft_model, draft_label = resolve_spec(draft_spec), draft
    check_vocabularies(target_spec, draft_model.folder, model.folder, draft_label)
    if damp is None:
        return Pair(model, draft_model, target, draft_label)
    damped = write_damped_target(model.folder, _derived_path(model.folder, f"damped{n}-x{damp:g}"), n, damp)
    # records name the model as typed; the label says it was damped
    return Pair(derived(damped, target), draft_model, f"{target} (layers >= {n} damped x{damp:g})", draft_label)


# ---------------------------------------------------------------- theory


def expected_tokens(alpha: float, k: float) -> float:
    """Leviathan et al.'s E[tokens per round] = (1 - alpha^(k+1)) / (1 - alpha)."""
    return k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def leviathan_alpha(stats: SpeculationStats) -> float:
    """The paper's per-token acceptance probability, estimated from the same counts."""
    trials = stats.accepted + stats.rejections
    return stats.accepted / trials if trials else math.nan


def predicted_speedup(tokens_per_round: float, k: float, cost_ratio: float) -> float:
    """Leviathan et al.'s speedup: tokens per round over the cost of a round in target steps, k*c for
    drafting plus one for the verification."""
    return tokens_per_round / (k * cost_ratio + 1)


def measured_prediction(stats: SpeculationStats, drafting: float, verify_cost: float) -> float:
    """The speedup the counts predict: tokens over target steps. Each target pass gains its accepted
    tokens plus one and costs verify_cost (a k+1 token pass), or one step after a round that proposed
    nothing; `drafting` is what all the rounds' drafting cost, in target steps."""
    passes = stats.rounds + stats.no_match
    if not passes:
        return math.nan
    return (stats.accepted + passes) / (drafting + stats.rounds * verify_cost + stats.no_match)


# ---------------------------------------------------------------- measurement


@dataclass(frozen=True)
class SpeculateConfig:
    ks: tuple[int, ...] = (4,)
    gen_tokens: int = 64
    runs: int = 3
    warmup: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    prompt: str = DEFAULT_PROMPT


@dataclass
class SpeculateResult:
    config: SpeculateConfig
    prompt_tokens: int = 0
    target_tps: list[float] = field(default_factory=list)  # one per run
    draft_tps: list[float] = field(default_factory=list)  # a draft model
    lookup_s: list[float] = field(default_factory=list)  # prompt lookup: seconds per lookup, one per run
    spec_tps: dict[int, list[float]] = field(default_factory=dict)  # k -> one per run
    stats: dict[int, SpeculationStats] = field(default_factory=dict)
    same_as_target: dict[int, list[bool]] = field(default_factory=dict)  # greedy: output == target's
    verify_cost: dict[int, float] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def chat_prompt(backend: Backend, text: str) -> list[int]:
    """The prompt every run uses: the chat template when the model has one, else the plain text."""
    if backend.has_chat_template:
        return backend.apply_chat_template([{"role": "user", "content": text}])
    return backend.tokenize(text)


def timed_decode(backend: Backend, prompt: list[int], gen: GenerationConfig, *,
                 draft: Backend | NgramDraft | None = None,
                 num_draft: int = 4, stats: SpeculationStats | None = None) -> tuple[float, list[int]]:
    """(decode tokens/s after the first token, tokens) of one generation."""
    run = TimedStream(backend.stream(prompt, gen, draft=draft, num_draft=num_draft, stats=stats)).consume()
    return run.decode_tps, run.tokens


def measure_verify_cost(target: Backend, prompt: list[int], k: int, repeats: int) -> float:
    """Time of one target pass over k+1 tokens after the prompt, in one-token passes (median of repeats)."""
    session = target.session()
    session.feed(prompt, keep=1)
    ids = (prompt * (k + 1))[: k + 1]  # any tokens: the cost depends on how many, not on which
    one, many = [], []
    for _ in range(repeats):
        for n, out in ((1, one), (k + 1, many)):
            start = time.perf_counter()
            session.feed(ids[:n], keep=n)
            out.append(time.perf_counter() - start)
            session.crop(len(prompt))
    return statistics.median(many) / statistics.median(one)


def lookup_seconds(target: Backend, draft: NgramDraft, tokens: list[int], first: int, k: int) -> float:
    """Mean time of one prompt-lookup proposal (the search and its one-hot q) on the committed
    prefixes of `tokens` that a generation's rounds see: the first `first` tokens and one more each time."""
    proposer = NgramProposer(draft, target.vocab_size, frozenset())
    times = []
    for end in range(first + 1, len(tokens)):
        prefix = tokens[:end]
        start = time.perf_counter()
        proposer.propose(prefix, k)
        times.append(time.perf_counter() - start)
    return statistics.fmean(times)


def measure(target: Backend, draft: Backend | NgramDraft, cfg: SpeculateConfig, on_step=None,
            result: SpeculateResult | None = None) -> SpeculateResult:
    """Interleaved runs: target alone, draft alone (or, for prompt lookup, its lookups on the target's
    tokens), then speculative for each k, each into the result as it ends (a caller that passes
    `result` keeps what ran if Ctrl-C stops it); the metrics are summarise()'s."""
    lookup = isinstance(draft, NgramDraft)
    prompt = chat_prompt(target, cfg.prompt)
    target.check_fits(len(prompt), cfg.gen_tokens)
    result = result or SpeculateResult(cfg)
    result.prompt_tokens = len(prompt)
    result.stats = {k: SpeculationStats() for k in cfg.ks}

    def gen(seed: int, tokens: int = cfg.gen_tokens) -> GenerationConfig:
        # EOS ignored: every variant produces the same number of tokens
        return GenerationConfig(max_tokens=tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                                ignore_eos=True)

    short = gen(cfg.seed, min(8, cfg.gen_tokens))
    for i in range(cfg.warmup):
        for k in (None, *cfg.ks):
            timed_decode(target, prompt, short, draft=draft if k else None, num_draft=k or 1)
        if not lookup:
            timed_decode(draft, prompt, short)
        if on_step:
            on_step("warmup", i + 1, None)
    for run in range(cfg.runs):
        g = gen(cfg.seed + run)
        tps, reference = timed_decode(target, prompt, g)
        result.target_tps.append(tps)
        if lookup:  # the longest k: the search costs the same for any k, the one-hot q grows with it
            result.lookup_s.append(lookup_seconds(target, draft, prompt + reference, len(prompt), max(cfg.ks)))
        else:
            result.draft_tps.append(timed_decode(draft, prompt, g)[0])
        for k in cfg.ks:
            tps, tokens = timed_decode(target, prompt, g, draft=draft, num_draft=k, stats=result.stats[k])
            result.spec_tps.setdefault(k, []).append(tps)
            result.same_as_target.setdefault(k, []).append(tokens == reference)
        if on_step:
            on_step("run", run + 1, result)
    for k in cfg.ks:
        result.verify_cost[k] = measure_verify_cost(target, prompt, k, max(cfg.runs, 1))
    result.metrics = summarise(result)
    return result


def summarise(result: SpeculateResult) -> dict:
    n_runs = len(result.target_tps)
    metrics: dict = {"runs_completed": n_runs, "prompt_tokens": result.prompt_tokens}
    if not n_runs or not (result.draft_tps or result.lookup_s):
        return metrics
    target_tps = statistics.median(result.target_tps)
    metrics.update(target_tps=target_tps, per_k={})
    if result.draft_tps:
        draft_tps = statistics.median(result.draft_tps)
        metrics.update(draft_tps=draft_tps, cost_ratio=target_tps / draft_tps)  # c = t_draft / t_target, per token
    else:
        lookup_s = statistics.median(result.lookup_s)
        metrics.update(lookup_s=lookup_s, lookup_target_steps=lookup_s * target_tps)
    for k, spec in result.spec_tps.items():
        runs = len(spec)
        st = result.stats[k]
        if result.draft_tps:  # the draft model runs once per drafted token
            cost_ratio = metrics["cost_ratio"]
            drafting = st.drafted * cost_ratio
        else:  # one lookup per round, whatever it finds
            cost_ratio = metrics["lookup_target_steps"] / k
            drafting = (st.rounds + st.no_match) * metrics["lookup_target_steps"]
        alpha = leviathan_alpha(st)
        verify = result.verify_cost.get(k)
        m = {
            **st.as_dict(),
            "speculative_tps": statistics.median(spec),
            # each run's ratio to the target alone in that same run, then the median
            "speedup": statistics.median(s / t for s, t in zip(spec, result.target_tps[:runs])),
            "tokens_per_round": 1 + st.mean_accepted,
            "cost_ratio": cost_ratio,
            "leviathan_alpha": alpha,
            "predicted_speedup_leviathan": predicted_speedup(expected_tokens(alpha, k), k, cost_ratio),
            "verify_cost_target_steps": verify,
            "predicted_speedup": measured_prediction(st, drafting, verify) if verify else None,
            "greedy_same_as_target": (all(result.same_as_target[k]) if result.config.temperature <= 0 else None),
        }
        m["efficiency"] = m["speedup"] / m["predicted_speedup"] if m["predicted_speedup"] else None
        metrics["per_k"][k] = m
    best = best_k(metrics["per_k"])
    if best is not None:
        b = metrics["per_k"][best]
        metrics.update(best_k=best, speedup=b["speedup"], speculative_tps=b["speculative_tps"],
                       acceptance=b["acceptance"], predicted_speedup=b["predicted_speedup"],
                       predicted_speedup_leviathan=b["predicted_speedup_leviathan"], efficiency=b["efficiency"])
    return metrics


def best_k(per_k: dict) -> int | None:
    """The fastest k among those that kept the output the target's (a greedy run whose tokens
    differed is a fault, however fast); None when no k did."""
    lossless = [k for k, m in per_k.items() if m["greedy_same_as_target"] is not False]
    return max(lossless, key=lambda k: per_k[k]["speedup"]) if lossless else None
