"""`billion bench`: speed and memory per engine, side by side, with a parity check."""

from __future__ import annotations

import click
from rich.table import Table

from billion.options import bench_options, engines, load_options, mmlu_options, model_options, results_option
from billion.tasks.bench import BenchConfig
from billion.ui import console, fmt


@click.command()
@model_options
@bench_options
@click.option("--parity/--no-parity", default=True, show_default=True,
              help="With several engines: compare their logits on the same tokens.")
@click.option("--draft", default=None,
              help="Decode speculatively with this draft (same vocabulary; or layers:N, the model's own first "
                   "N layers; or ngram[:N], prompt lookup without a model); `billion speculate` measures it "
                   "against the model alone.")
@click.option("--num-draft", type=click.IntRange(1), default=BenchConfig.num_draft, show_default=True,
              help="Draft tokens per round.")
@click.option("--batch", "batch_sizes", default=None, callback=lambda ctx, param, v: _sizes(v),
              help="Comma list of batch sizes (e.g. 1,2,4,8,16): throughput of that many sequences decoded "
                   "together by the engine's batch generator, instead of the one-sequence runs.")
@click.option("--mmlu", "with_mmlu", is_flag=True,
              help="Also score MMLU on each engine (as `billion mmlu`, set with the --mmlu-* options) "
                   "and put its accuracy in the table.")
@mmlu_options(prefix="mmlu-")
@results_option
def bench(model, backend, prompt_tokens, gen_tokens, runs, warmup, seed, parity, batch_sizes, with_mmlu, draft,
          num_draft, results_dir, **opts):
    """Prefill and decode speed, time to first token and peak memory.

    Random prompt tokens, EOS ignored, greedy: every engine does the same work. With
    --backend all, engines run one after the other on the same weights and a parity
    check compares their next-token distributions teacher-forced on the same tokens.
    """
    from backends.speculation import NgramDraft
    from billion.evaluation import mmlu_options_of, prepare_mmlu
    from billion.loading import resolve
    from billion.runner import Runner
    from billion.tasks import bench as task
    from billion.tasks.speculate import draft_name, prepare_pair

    cfg = task.BenchConfig(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, runs=runs, warmup=warmup, seed=seed,
                           num_draft=num_draft)
    pair = prepare_pair(model, draft) if draft else None  # the vocabulary check runs before any model loads
    model = pair.target if pair else resolve(model)
    names = engines(backend)
    if batch_sizes:
        if with_mmlu or (draft and not (pair and isinstance(pair.draft, NgramDraft))):
            raise click.UsageError("--batch takes no --mmlu, and of the drafts only ngram[:N] (prompt lookup)")
        return _batch_sweep(model, names, cfg, batch_sizes, load_options(opts), results_dir,
                            pair.draft if pair else None)
    mmlu_opts = mmlu_options_of(opts)
    mmlu_run = prepare_mmlu(**mmlu_opts) if with_mmlu else None  # missing data fails before any model loads
    done, parity_data = {}, {}
    with Runner("bench", model, load_options(opts), cfg, results_dir) as runner:
        for run in runner.engines(names, parameters=True):
            with runner.draft(run.name, pair) as d:
                result = task.BenchResult(cfg)
                with runner.until_interrupted(run):
                    task.run_bench(run.backend, cfg, draft=d, on_run=_progress(runs, warmup), result=result)
                metrics = task.summarise(run.backend, result)
                if parity and len(names) > 1 and result.runs and not run.interrupted:
                    parity_data[run.name] = _parity_logits(runner, run, cfg, result, parity_data)
                if mmlu_run and not run.interrupted:
                    metrics.update(_with_mmlu(runner, run, *mmlu_run))
                if run.info.compiled:  # the compile time is known once the warm-up has paid it
                    run.info = run.backend.info()
                    console.print(f"  {run.info.compiled}")
                runner.record(run, metrics, config={"draft": draft_name(draft)},
                              extra={"runs": [r.__dict__ for r in result.runs]})
                done[run.name] = metrics
        _print_table(model, done)
        _print_ratios(done)
        _print_parity(runner, cfg, parity_data)


def _sizes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma list of batch sizes, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("batch sizes are at least 1")
    return sizes


def _batch_sweep(model, names, cfg, sizes, options, results_dir, draft=None) -> None:
    """bench --batch: each engine, each batch size, one bench_batch record; then the table. With a
    prompt-lookup draft, plain and drafted batches alternate on the same repetitive prompts."""
    from billion.runner import Runner
    from billion.tasks import batch_bench as task

    done = {}
    with Runner("bench_batch", model, options, cfg, results_dir) as runner:
        for run in runner.engines(names, parameters=True):
            for size in sizes:
                for variant in ((None, draft) if draft else (None,)):
                    label = f"batch {size}" + (f" {variant}" if variant else "")
                    result = task.BatchBenchResult(size)
                    with runner.until_interrupted(run):
                        task.run_batch_bench(run.backend, cfg, size, draft=variant, repetitive=bool(draft),
                                             result=result, on_run=lambda i, r, label=label: console.print(
                                                 f"  {label} run {i}/{cfg.runs}: TTFT {r.ttft_s:.3f} s, aggregate "
                                                 f"decode {r.decode_tps:.1f} tok/s"))
                    config = {"batch_size": size, "draft": str(variant) if variant else None,
                              "repetitive_prompts": bool(draft)}
                    done[(run.name, size, str(variant or ""))] = runner.record(
                        run, task.summarise(run.backend, result), config=config,
                        extra={"runs": [r.__dict__ for r in result.runs]})["metrics"]
                    if run.interrupted:
                        break
                if run.interrupted:
                    break
        _print_batch_table(model, done)


def _print_batch_table(model, done: dict) -> None:
    table = Table(title=f"bench --batch {model} (x: aggregate decode against the engine's smallest plain batch)")
    drafts = any(d for _, _, d in done)
    draft_cols = ("draft", "accept") if drafts else ()
    for col in ("engine", "batch", *draft_cols, "prefill tok/s", "TTFT s", "aggregate tok/s", "x",
                "per-sequence tok/s", "peak GB"):
        table.add_column(col, justify="left" if col in ("engine", "draft") else "right")
    base = {}
    for (name, size, draft), m in done.items():
        agg = m.get("aggregate_decode_tps")
        if not draft:
            base.setdefault(name, agg)
        accept = m.get("draft_acceptance")
        table.add_row(name, str(size), *((draft or "-", f"{accept:.0%}" if accept is not None else "-") if drafts
                                         else ()),
                      fmt(m.get("prefill_tps")), fmt(m.get("ttft_s"), 3), fmt(agg),
                      f"{agg / base[name]:.2f}" if agg and base.get(name) else "-",
                      fmt(m.get("per_sequence_decode_tps")), fmt(m.get("peak_memory_gb")))
    console.print(table)


def _progress(runs: int, warmup: int):
    def progress(kind, i, run):
        if run:
            console.print(f"  run {i}/{runs}: TTFT {run.ttft_s:.3f} s, decode {run.decode_tps:.2f} tok/s")
        else:
            console.print(f"  warm-up {i}/{warmup} done")

    return progress


def _parity_logits(runner, run, cfg, result, parity_data: dict):
    """The engine's logits on the parity sequence: the first engine's prompt and greedy tokens, so
    every engine is scored teacher-forced on the same tokens."""
    from billion.tasks import bench as task

    if parity_data:
        seq = next(iter(parity_data.values()))[2]
    else:
        seq = task.random_prompt(run.backend.vocab_size, cfg.prompt_tokens, cfg.seed) + result.runs[0].tokens
    with console.status(f"parity: {run.name} logits on {len(seq)} tokens..."), runner.until_interrupted(run):
        return run.backend.logits(seq), result.runs[0].tokens, seq
    return None


def _with_mmlu(runner, run, subjects, mmlu_cfg) -> dict:
    """bench --mmlu: MMLU scored on the loaded engine, its own record, its accuracy for the table."""
    from billion.evaluation import evaluate_mmlu, mmlu_record_parts
    from billion.tasks.mmlu import bench_metrics

    scored = evaluate_mmlu(runner, run, subjects, mmlu_cfg)
    metrics, extra = mmlu_record_parts(scored, mmlu_cfg)
    runner.record(run, {k: v for k, v in metrics.items() if k != "per_subject"}, extra=extra, task="mmlu",
                  settings=mmlu_cfg)
    return bench_metrics(metrics)


def _print_ratios(done: dict) -> None:
    from billion.tasks.compare import ratios

    if len(done) < 2:
        return
    first, *others = list(done)
    for other in others:
        r = ratios(done[first], done[other])
        console.print(f"ratios {other}/{first}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    if done[first].get("memory_source") != done[others[0]].get("memory_source"):
        console.print("peak memory: different counters per engine, shown side by side, not divided")


def _print_parity(runner, cfg, parity_data: dict) -> None:
    from billion.tasks.compare import parity as parity_check

    parity_data = {k: v for k, v in parity_data.items() if v is not None}
    if len(parity_data) < 2:
        return
    (a_name, (la, ta, _)), *rest = parity_data.items()
    for b_name, (lb, tb, _) in rest:
        p = parity_check(la, lb, ta, tb)
        divergence = p["first_greedy_divergence"]
        console.print(f"[bold]parity {a_name} vs {b_name}[/] ({p['positions']} positions, teacher-forced): "
                      f"top-1 agreement {p['top1_agreement']:.1%}, max |Δlogit| {p['max_abs_logit_diff']:.2e}, "
                      f"mean KL {p['mean_kl']:.2e}, max KL {p['max_kl']:.2e}, first greedy divergence: "
                      f"{divergence if divergence is not None else 'none'} in {p['greedy_tokens_compared']} tokens")
        runner.agreement(a_name, b_name, p, task="parity", config=runner.options.record())


def _print_table(model: str, done: dict) -> None:
    table = Table(title=f"bench {model}")
    mmlu = next((m for m in done.values() if "mmlu_acc" in m), None)
    mmlu_col = ("MMLU",) if mmlu else ()
    if mmlu:
        table.caption = f"MMLU: {mmlu['mmlu_shots']}-shot {mmlu['mmlu_method']} accuracy (questions)"
    for col in ("engine", "prefill tok/s", "TTFT s", "decode tok/s", "min-max", "% BW", "weights GB", "peak GB",
                *mmlu_col):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for name, m in done.items():
        frac = m.get("bandwidth_fraction")
        acc = m.get("mmlu_acc")
        table.add_row(name, fmt(m.get("prefill_tps")), fmt(m.get("ttft_s"), 3), fmt(m.get("decode_tps")),
                      f"{fmt(m.get('decode_tps_min'))}-{fmt(m.get('decode_tps_max'))}",
                      f"{frac:.0%}" if frac else "-", fmt(m["weight_gb"]), fmt(m["peak_memory_gb"]),
                      *((f"{acc:.1%} ({m['mmlu_questions']})" if acc is not None else "-",) if mmlu else ()))
    console.print(table)
    for name, m in done.items():
        console.print(f"  {name}: peak memory from {m['memory_source']}; bandwidth {fmt(m['bandwidth_gbs'])} GB/s "
                      f"({m['bandwidth_source']}); % BW = decode tok/s / (bandwidth / "
                      f"{fmt(m['decode_gb_per_token'], 3)} GB read per token)")
        if m.get("bandwidth_fault"):
            console.print(f"  [red]{name}: measurement fault, no % BW: {m['bandwidth_fault']}[/]")
