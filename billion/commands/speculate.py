"""`billion speculate`: speculative decoding measured against the target alone, per engine."""

from __future__ import annotations

from dataclasses import asdict, replace

import click
from rich.table import Table

from billion.options import QUANTIZE_CHOICES, engines, load_options, model_options, results_option
from billion.tasks.speculate import SpeculateConfig
from billion.ui import console, fmt


def _ks(ctx, param, value: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(x) for x in value.split(",") if x.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected a comma list of integers, got {value!r}") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter("k must be at least 1")
    return ks


@click.command()
@model_options(flags=("--target", "-t"), param="target", skip=("compile",))
@click.option("--draft", "-d", default="layers:2", show_default=True,
              help="A smaller model with the SAME vocabulary, layers:N (the target's own first N layers, "
                   "final norm and head), or ngram[:N] (prompt lookup, no model: propose what followed the last "
                   "earlier occurrence of the text's final n-gram, n <= N, default 3).")
@click.option("--num-draft", "--k", "ks", default=",".join(map(str, SpeculateConfig.ks)), show_default=True,
              callback=_ks,
              help="Draft tokens per round; a comma list (1,2,4) sweeps them and reports the best.")
@click.option("--gen-tokens", "-n", type=click.IntRange(2), default=SpeculateConfig.gen_tokens, show_default=True)
@click.option("--runs", "-r", type=click.IntRange(1), default=SpeculateConfig.runs, show_default=True,
              help="Timed runs, each: target alone, draft alone (ngram: its lookups), speculative for every k.")
@click.option("--warmup", type=click.IntRange(0), default=SpeculateConfig.warmup, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=SpeculateConfig.temperature, show_default=True,
              help="0: greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=SpeculateConfig.top_p, show_default=True)
@click.option("--seed", type=int, default=SpeculateConfig.seed, show_default=True)
@click.option("--prompt", default=None, help="User message (wrapped in the chat template when there is one).")
@click.option("--damp", type=float, default=None,
              help="Demonstration on random: targets with a layers:N draft: scale the output projections of the "
                   "layers the draft lacks by this factor (e.g. 0.1) in a copy of the target, so that acceptance "
                   "is not ~0% on random weights. Same compute; says nothing about real models.")
@click.option("--draft-quantize", type=click.Choice(QUANTIZE_CHOICES), default=None,
              help="The draft's weights, quantized at load time (independently of the target's).")
@results_option
def speculate(target, draft, backend, device, dtype, ks, gen_tokens, runs, warmup, temperature, top_p, seed,
              prompt, damp, trust_remote_code, quantize, draft_quantize, group_size, results_dir):
    """Speculative decoding: a draft proposes k tokens, the target verifies them in one pass.

    Lossless (greedy: the target's own tokens; sampling: the target's distribution). In float32
    the greedy output is the target's own token for token;
    in bfloat16 the target scores k+1 tokens per pass, so a near-tied argmax can resolve the other way. Draft and
    target must share a vocabulary; this is checked before anything loads. Each run times, on
    the same prompt and chat template, the target alone, the draft alone and speculative
    decoding for every k (decode tokens/s after the first token); reports the acceptance rate
    (accepted / drafted), tokens per round, the measured speedup and the speedup predicted by
    Leviathan et al. (2023) from the acceptance and the draft/target cost ratio, and a prediction
    with the measured cost of verifying k+1 tokens, whose ratio to the measured speedup is the
    implementation's efficiency. With --draft ngram there is no draft model: the cost ratio comes from
    the measured time of its lookups, and rounds that found no match count as plain target steps.
    """
    from backends.speculation import NgramDraft
    from billion.runner import Runner
    from billion.tasks import speculate as task

    cfg = task.SpeculateConfig(ks=ks, gen_tokens=gen_tokens, runs=runs, warmup=warmup, temperature=temperature,
                               top_p=top_p, seed=seed, prompt=prompt or task.DEFAULT_PROMPT)
    names = engines(backend)
    with console.status("checking the pair (building derived folders if needed)..."):
        pair = task.prepare_pair(target, draft, damp)
    console.print(f"target: {pair.target_label}\ndraft:  {pair.draft_label}")
    options = load_options(dict(device=device, dtype=dtype, trust_remote_code=trust_remote_code, quantize=quantize,
                                group_size=group_size))
    lookup = isinstance(pair.draft, NgramDraft)
    config = {"target": target, "draft": task.draft_name(draft), "damp": damp, "draft_quantize": draft_quantize,
              "target_label": pair.target_label, "draft_label": pair.draft_label}
    done = {}
    with Runner("speculate", pair.target, options, cfg, results_dir) as runner:
        for run in runner.engines(names, label=pair.target_label):
            with runner.draft(run.name, pair, options=replace(options, quantize=draft_quantize)) as d:
                draft_info = {"prompt_lookup": asdict(d)} if lookup else d.info().__dict__
                console.print("  draft: " + (f"{d} (prompt lookup, no model)" if lookup else
                                              f"{draft_info['parameters'] / 1e9:.2f}B parameters"))
                result = task.SpeculateResult(cfg)
                with console.status(f"{run.name}: measuring..."), runner.until_interrupted(run):
                    task.measure(run.backend, d, cfg, on_step=_progress(runs, warmup, lookup), result=result)
                metrics = task.summarise(result)
                runner.record(run, metrics, config=config, extra={
                    "target_info": run.info.__dict__, "draft_info": draft_info,
                    "runs": {"target_tps": result.target_tps, "draft_tps": result.draft_tps,
                             "lookup_s": result.lookup_s, "speculative_tps": result.spec_tps,
                             "greedy_same_as_target": result.same_as_target}})
                done[run.name] = metrics
        _print_table(pair, done)


def _progress(runs: int, warmup: int, lookup: bool):
    def progress(kind, i, result):
        if kind == "warmup":
            console.print(f"  warm-up {i}/{warmup} done")
            return
        spec = ", ".join(f"k={k} {fmt(v[-1])}" for k, v in result.spec_tps.items())
        alone = f"lookup {fmt(result.lookup_s[-1] * 1e6)} us" if lookup else f"draft {fmt(result.draft_tps[-1])}"
        console.print(f"  run {i}/{runs}: target {fmt(result.target_tps[-1])} tok/s, {alone}, speculative {spec}")

    return progress


def _print_table(pair, done: dict) -> None:
    from backends.speculation import NgramDraft

    lookup = isinstance(pair.draft, NgramDraft)
    for name, m in done.items():
        if "draft_tps" in m:
            console.print(f"{name}: target alone {fmt(m['target_tps'])} tok/s, draft alone {fmt(m['draft_tps'])} "
                          f"tok/s, cost ratio c = {fmt(m['cost_ratio'], 3)}")
        elif "lookup_s" in m:
            console.print(f"{name}: target alone {fmt(m['target_tps'])} tok/s, one lookup {fmt(m['lookup_s'] * 1e6)} "
                          f"us = {fmt(m['lookup_target_steps'], 3)} target steps")
    table = Table(title=f"{pair.target_label} <- {pair.draft_label}")
    for col in ("engine", "k", "accept", *(("no match",) if lookup else ()), "tok/round", "spec tok/s", "speedup",
                "Leviathan", "verify", "predicted", "eff.", "lossless"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for name, m in done.items():
        for k, r in m.get("per_k", {}).items():
            best = "*" if k == m.get("best_k") and len(m["per_k"]) > 1 else ""
            same = r["greedy_same_as_target"]
            no_match = r["no_match_rounds"] / max(r["rounds"] + r["no_match_rounds"], 1)
            table.add_row(name, f"{k}{best}", f"{r['acceptance']:.0%}" if r["drafted"] else "-",
                          *((f"{no_match:.0%}",) if lookup else ()), fmt(r["tokens_per_round"]),
                          fmt(r["speculative_tps"]), f"{fmt(r['speedup'])}x",
                          f"{fmt(r['predicted_speedup_leviathan'])}x", fmt(r["verify_cost_target_steps"]),
                          f"{fmt(r['predicted_speedup'])}x", f"{r['efficiency']:.0%}" if r["efficiency"] else "-",
                          "sampled" if same is None else ("yes" if same else "NO"))
    console.print(table)
    console.print("accept: accepted / drafted. speedup: speculative / target-alone decode tok/s, same run, median "
                  "over runs. Leviathan: E(alpha, k) / (k c + 1). verify: cost of a (k+1)-token target pass in "
                  "one-token passes. predicted: measured tokens/round / (k c + verify). eff.: speedup / predicted. "
                  "lossless: greedy output == the target's own. *: best k."
                  + (" no match: rounds whose lookup found nothing, one plain target step each (predicted counts "
                     "them); c: one lookup's target steps / k." if lookup else ""))
