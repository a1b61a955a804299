"""`billion load`: a load benchmark of running OpenAI-compatible servers, a record per server and point."""

from __future__ import annotations

import click
from rich.table import Table

from billion.options import results_option
from billion.ui import console, fmt


@click.command()
@click.argument("targets", nargs=-1, required=True, metavar="[NAME=]URL[#MODEL]...")
@click.option("--concurrency", "-c", default=None, metavar="LIST",
              help="Comma list of concurrencies: that many requests kept in flight, each point in turn. "
                   "Default 1,2,4,8,16,32 (none with --rate alone).")
@click.option("--rate", default=None, metavar="LIST",
              help="Comma list of request rates (requests/s): Poisson arrivals, seeded, whatever the answers.")
@click.option("--requests", type=click.IntRange(1), default=None,
              help="Requests per point. Default: 4 per concurrent request (at least 16); 32 at a rate.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=600.0, show_default=True,
              help="Seconds per point; requests not finished by then are cancelled and fail.")
@click.option("--prompt-len", default="128", show_default=True, metavar="N|LOW-HIGH",
              help="Prompt length in random made-up words (uniform over LOW-HIGH).")
@click.option("--output-len", default=None, metavar="N|LOW-HIGH",
              help="max_tokens per request, EOS ignored (uniform over LOW-HIGH). Default 64, or with "
                   "--dataset the word count of each answer.")
@click.option("--dataset", type=click.Path(dir_okay=False), default=None,
              help="ShareGPT-style JSON: prompts are the first human turns, output lengths the words of the "
                   "gpt turns answering them.")
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True,
              help="/v1/completions or /v1/chat/completions.")
@click.option("--slo", default=None, metavar="KEY=S,...",
              help="Service-level objectives in seconds for goodput (vLLM's keys): ttft, tpot, e2el; "
                   "e.g. ttft=0.5,tpot=0.05,e2el=10.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompts, lengths and arrivals.")
@results_option
def load(targets, concurrency, rate, requests, timeout, prompt_len, output_len, dataset, endpoint, slo, seed,
         results_dir):
    """Load-test running OpenAI-compatible servers (billion serve, llama-server, mlx_lm.server, vLLM).

    Each target is a loopback base URL, optionally with the model to ask for
    (URL#MODEL; needed when the server lists several) and the name tables, records and
    charts give it (NAME=URL; default: the engine of a billion id, else the server's
    owned_by). Every point (a concurrency or a request rate) sends the same streamed requests
    to each server in turn and measures TTFT, inter-token latency, TPOT, end-to-end latency,
    output tok/s, requests/s and goodput; one serve_bench record per server and point.
    """
    import asyncio

    from billion.tasks import serve_bench as task

    parsed = task.parse_targets(targets)
    cfg = task.ServeBenchConfig(endpoint=endpoint, prompt_len=prompt_len, output_len=output_len, dataset=dataset,
                                requests=requests, timeout_s=timeout, seed=seed, slo=task.parse_slo(slo))
    make = task.workload(cfg)  # a bad length or dataset fails here, before any request
    points = [task.Point(concurrency=c) for c in (task.parse_list(concurrency, "--concurrency") if concurrency
                                                   else () if rate else task.DEFAULT_CONCURRENCY)]
    points += [task.Point(rate=r) for r in (task.parse_list(rate, "--rate", float) if rate else ())]
    for point in points:
        if point.concurrency and requests and requests < point.concurrency:
            console.print(f"note: --requests {requests} keeps at most {requests} in flight at {point}", style="yellow")
    done: list[tuple] = []
    on_point = _recorder(cfg, results_dir, done)
    asyncio.run(task.sweep(parsed, points, cfg, make, on_point, on_connect=_print_servers))
    _print_table(done, cfg)


def _print_servers(servers) -> None:
    from rich.markup import escape

    for s in servers:
        console.print(f"[bold]{escape(s.name)}[/]: {escape(s.model_id)} at {s.url}")


def _recorder(cfg, results_dir, done: list):
    """on_point for the sweep: the record of one server at one point, a progress line, a table row."""
    from dataclasses import asdict

    from billion.records.store import make_record, write_record
    from billion.tasks import serve_bench as task

    sources: dict = {}

    def on_point(server, point, run, started) -> None:
        metrics = task.summarise(run, cfg.slo)
        if server.model_id not in sources:  # once per model id: it reads (or builds) the model's folder
            sources[server.model_id] = task.served_source(server.model_id) if server.billion else None
        config = {**asdict(cfg), **point.record(), "url": server.url, "served_model": server.model_id,
                  "workload": task.describe(cfg)}
        record = make_record("serve_bench", server.name, server.model, config, metrics, started=started,
                             source=sources[server.model_id], extra={"requests": task.per_request(run)})
        path = write_record(record, results_dir)
        done.append((server, point, metrics))
        console.print(f"  {server.name} {point}: {metrics['requests_ok']}/{metrics['requests']} ok, "
                      f"{fmt(metrics['output_tps'])} tok/s, TTFT p50 {fmt(metrics['ttft_p50_s'], 3)} s, "
                      f"ITL p50 {fmt(metrics['itl_p50_s'], 3)} s"
                      + (f"; errors: {'; '.join(metrics['errors'])}" if metrics["errors"] else ""), markup=False)
        console.print(f"  record: {path}", soft_wrap=True, markup=False)

    return on_point


def _print_table(done: list, cfg) -> None:
    from billion.tasks.serve_bench import describe

    table = Table(title=f"billion load: {describe(cfg)}")
    table.caption = ("load: c=N requests in flight, r=N requests/s; latencies in seconds; ITL: gaps between "
                     "text events (tok/event > 1: several tokens an event); TPOT: (E2E - TTFT) / (tokens - 1) "
                     "per request" + (f"; goodput: requests/s meeting {_slo_text(cfg.slo)}" if cfg.slo else ""))
    cols = ["server", "load", "ok", "out tok/s", "req/s", *(["goodput"] if cfg.slo else []), "TTFT p50",
            "TTFT p99", "ITL p50", "ITL p99", "TPOT p50", "E2E p50", "E2E p99", "tok/event"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("server", "load") else "right")
    for server, point, m in done:
        level = f"c={point.concurrency}" if point.concurrency else f"r={point.rate:g}"
        table.add_row(server.name, level, f"{m['requests_ok']}/{m['requests']}", fmt(m["output_tps"]),
                      fmt(m["requests_per_s"]), *([fmt(m["goodput_rps"])] if cfg.slo else []),
                      fmt(m["ttft_p50_s"], 3), fmt(m["ttft_p99_s"], 3), fmt(m["itl_p50_s"], 3),
                      fmt(m["itl_p99_s"], 3), fmt(m["tpot_p50_s"], 3), fmt(m["e2e_p50_s"], 3),
                      fmt(m["e2e_p99_s"], 3), fmt(m["tokens_per_event"]))
    console.print(table)


def _slo_text(slo: dict) -> str:
    return ", ".join(f"{key} <= {limit:g} s" for key, limit in slo.items())
