"""`billion bench`: speed and memory per engine, side by side, with a parity check."""

from __future__ import annotations

import time

import click
from rich.table import Table

from billion.tasks.bench import BenchConfig
from billion.commands import (bench_options, console, engines, evaluate_mmlu, fmt, load_kwargs, loaded,
                              loaded_draft, mmlu_options, model_options, prepare_mmlu, print_engine, results_option,
                              write_mmlu_record)


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
@click.option("--mmlu", "with_mmlu", is_flag=True,
              help="Also score MMLU on each engine (as `billion mmlu`, set with the --mmlu-* options) "
                   "and put its accuracy in the table.")
@mmlu_options(prefix="mmlu-")
@results_option
def bench(model, backend, prompt_tokens, gen_tokens, runs, warmup, seed, parity, with_mmlu, draft, num_draft,
          results_dir, **opts):
    """Prefill and decode speed, time to first token and peak memory.

    Random prompt tokens, EOS ignored, greedy: every engine does the same work. With
    --backend all, engines run one after the other on the same weights and a parity
    check compares their next-token distributions teacher-forced on the same tokens.
    """
    from contextlib import nullcontext

    from billion.tasks import bench as task
    from billion.tasks.compare import parity as parity_check, ratios
    from billion.records.store import make_record, write_record
    from billion.loading import resolve
    from billion.tasks.speculate import draft_name, prepare_pair

    cfg = task.BenchConfig(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, runs=runs, warmup=warmup, seed=seed,
                           num_draft=num_draft)
    model = resolve(model)  # once: every step below gets the folder, not the text
    pair = None
    if draft:  # the vocabulary check runs before any model loads
        pair = prepare_pair(model, draft)
    names = engines(backend)
    mmlu_run = None
    if with_mmlu:  # the questions load before any model: missing data fails fast
        mmlu_run = prepare_mmlu(**{k[len("mmlu_"):]: v for k, v in opts.items() if k.startswith("mmlu_")})
    done, parity_data, parity_seq = {}, {}, None
    interrupted = False
    for name in names:
        started = time.time()
        with loaded(name, model, **load_kwargs(opts)) as b, \
                (loaded_draft(name, pair.draft, **load_kwargs(opts)) if pair else nullcontext()) as d:
            info = b.info()
            print_engine(name, info, parameters=True)

            def progress(kind, i, run):
                if run:
                    console.print(f"  run {i}/{runs}: TTFT {run.ttft_s:.3f} s, decode {run.decode_tps:.2f} tok/s")
                else:
                    console.print(f"  warm-up {i}/{warmup} done")

            result = task.run_bench(b, cfg, draft=d, on_run=progress)
            metrics = dict(result.metrics)
            if parity and len(names) > 1 and result.runs and not result.interrupted:
                if parity_seq is None:  # every engine is scored on the first engine's tokens
                    parity_seq = task.random_prompt(b.vocab_size, prompt_tokens, seed) + result.runs[0].tokens
                with console.status(f"parity: {name} logits on {len(parity_seq)} tokens..."):
                    try:
                        parity_data[name] = (b.logits(parity_seq), result.runs[0].tokens)
                    except KeyboardInterrupt:
                        result.interrupted = True
            if mmlu_run and not result.interrupted:
                from billion.tasks.mmlu import bench_metrics

                scored = evaluate_mmlu(b, str(model), *mmlu_run, results_dir, opts)
                metrics.update(bench_metrics(write_mmlu_record(name, model, mmlu_run[1], scored, info, opts,
                                                               results_dir, started)))
                result.interrupted = scored.interrupted
            if info.compiled:  # the compile time is known once the warm-up has paid it
                info = b.info()
                console.print(f"  {info.compiled}")
            status = "interrupted" if result.interrupted else "complete"
            config = {**task.config_dict(cfg), **load_kwargs(opts), "draft": draft_name(draft)}
            record = make_record("bench", name, model, config, metrics, started=started, status=status,
                                 extra={"model_info": info.__dict__, "runs": [r.__dict__ for r in result.runs]})
            path = write_record(record, results_dir)
            console.print(f"  record: {path}")
            done[name] = metrics
            if result.interrupted:
                interrupted = True
                break

    _print_table(model, done)
    if len(done) > 1:
        first, *others = list(done)
        for other in others:
            r = ratios(done[first], done[other])
            console.print(f"ratios {other}/{first}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
        if done[first].get("memory_source") != done[others[0]].get("memory_source"):
            console.print("peak memory: different counters per engine, shown side by side, not divided")
    if len(parity_data) > 1:
        (a_name, (la, ta)), *rest = parity_data.items()
        for b_name, (lb, tb) in rest:
            p = parity_check(la, lb, ta, tb)
            console.print(f"[bold]parity {a_name} vs {b_name}[/] ({p['positions']} positions, teacher-forced): "
                          f"top-1 agreement {p['top1_agreement']:.1%}, max |Δlogit| {p['max_abs_logit_diff']:.2e}, "
                          f"mean KL {p['mean_kl']:.2e}, max KL {p['max_kl']:.2e}, first greedy divergence: "
                          f"{p['first_greedy_divergence'] if p['first_greedy_divergence'] is not None else 'none'}"
                          f" in {p['greedy_tokens_compared']} tokens")
            rec = make_record("parity", f"{a_name},{b_name}", model, {**task.config_dict(cfg), **load_kwargs(opts)},
                              p, started=time.time())
            console.print(f"  record: {write_record(rec, results_dir)}")
    if interrupted:
        raise KeyboardInterrupt


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
