"""Render records (JSON files under results/) as tables: on screen or as Markdown, with PNG charts."""

from __future__ import annotations

import hashlib
import re
import textwrap
from pathlib import Path
from typing import Callable, NamedTuple

# The metrics worth a column, per task; other tasks show their first numeric metrics.
COLUMNS = {
    "bench": ["prefill_tps", "ttft_s", "decode_tps", "bandwidth_fraction", "weight_gb", "peak_memory_gb"],
    "parity": ["positions", "top1_agreement", "max_abs_logit_diff", "mean_kl", "first_greedy_divergence"],
    "overhead": ["billion_s", "library_s", "ratio"],
    "quality": ["positions", "mean_kl", "median_kl", "p99_kl", "max_kl", "top1_agreement", "ppl_full", "ppl_quant"],
    "serve_overhead": ["direct_ttft_s", "server_ttft_s", "ttft_ratio", "direct_requests_per_s",
                       "server_requests_per_s", "request_ratio"],
    "bench_batch": ["batch_size", "prefill_tps", "ttft_s", "aggregate_decode_tps", "per_sequence_decode_tps",
                    "peak_memory_gb"],
    "serve_bench": ["concurrency", "request_rate", "requests_ok", "requests_failed", "output_tps", "requests_per_s",
                    "goodput_rps", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "tpot_p50_s", "e2e_p50_s"],
}
# Columns a record may keep in its config rather than its metrics.
CONFIG_COLUMNS = ("batch_size", "concurrency", "request_rate")
MAX_GENERIC = 6
CHARTS_DIR = "charts"  # next to the Markdown file
ENGINE_COLORS = {"mlx": "C0", "torch": "C1", "llama.cpp": "C2"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)


# llama.cpp's names for the GGUF types its peer runs (backends/llamacpp_engine/convert.py: billion's
# float dtypes are converted to F32/F16/BF16 files, int8 and int4 quantized to Q8_0 and Q4_0).
LLAMACPP_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}


def _llamacpp_type(rec: dict) -> str:
    """The GGUF type a llama.cpp record ran: its quantization (`llama.cpp Q8_0 (blocks of 32...)`),
    else its dtype, in llama.cpp's names."""
    info = rec.get("model_info") or {}
    found = re.match(r"llama\.cpp (\S+)", str(info.get("quantization") or ""))
    if found:
        return found.group(1)
    name = rec["config"].get("quantize") or info.get("dtype") or rec["config"].get("dtype") or "float32"
    return LLAMACPP_TYPES.get(name, str(name))


def precision(rec: dict) -> str:
    """dtype, then the quantization scheme and whether decoding was compiled (`float32 int4`,
    `bfloat16 compiled`), or `-`; a llama.cpp record's GGUF type (`F16`, `Q8_0`)."""
    if rec.get("backend") == "llama.cpp":
        return _llamacpp_type(rec)
    info = rec.get("model_info") or {}
    dtype = info.get("dtype") or rec["config"].get("dtype") or "-"
    if rec["config"].get("quantize"):
        dtype = rec["config"]["quantize"] if dtype == "-" else f"{dtype} {rec['config']['quantize']}"
    # what the engine did (a -b all --compile run's MLX record decoded uncompiled), else what was asked
    compiled = bool(info["compiled"]) if "compiled" in info else rec["config"].get("compile")
    if compiled and dtype != "-":  # ("-": a peer_bench record, whose rows say it)
        dtype = f"{dtype} compiled"
    return str(dtype)


# Comparable precisions, whichever engine named them, in the order the charts show them.
PRECISION_GROUPS = ("32-bit float", "16-bit float", "int8 weights", "int4 weights")


def precision_group(prec: str) -> str:
    """The class of comparable precisions `prec` (as `precision` writes it) belongs to: float32 and
    llama.cpp's F32 are `32-bit float`; float16, bfloat16, F16 and BF16 `16-bit float`; a quantization
    scheme decides over the dtype it computes in, so `float32 int8`, `bfloat16 int8 compiled`,
    `int8-dynamic`, `bnb-int8` and Q8_0 are `int8 weights` (Q4_0, Q4_1 and int4 `int4 weights`).
    Anything else is its own class."""
    words = [w for w in prec.split() if w != "compiled"]
    for word in reversed(words):  # the scheme comes after the dtype
        scheme = re.fullmatch(r"(?:\w+-)?int(\d+)(?:-\w+)?|q(\d+)(?:_\w+)?", word, re.IGNORECASE)
        if scheme:
            return f"int{scheme.group(1) or scheme.group(2)} weights"
    floating = re.fullmatch(r"b?f(?:loat)?(\d+)", words[0], re.IGNORECASE) if words else None
    return f"{floating.group(1)}-bit float" if floating else " ".join(words) or "-"


def _group_order(group: str) -> tuple:
    return (PRECISION_GROUPS.index(group) if group in PRECISION_GROUPS else len(PRECISION_GROUPS), group)


def source(rec: dict) -> str:
    """Where the weights came from: `Q4_1 GGUF`, `random`, `tiny`, or `-` (a folder or Hub model).
    Records older than `model_source` only say it in the spec."""
    src = rec.get("model_source")
    if src is None and rec["model"].partition(":")[0] in ("random", "tiny"):
        src = {"kind": rec["model"].partition(":")[0]}
    if not src:
        return "-"
    return f"{src.get('quantization')} GGUF" if src["kind"] == "gguf" else src["kind"]


def short_model(model: str) -> str:
    """A model as charts name it: a file or folder path (another server's model id) by its last part."""
    return model.rstrip("/").rsplit("/", 1)[-1] if "/" in model and model.startswith(("/", "~", ".")) else model


def model_title(rec: dict) -> str:
    """The model spec with its weights' source: `gguf:smollm2-135m (Q4_1 GGUF, dequantized)`."""
    label = source(rec)
    note = {"-": None, "random": "random weights", "tiny": "tiny random model"}.get(label, f"{label}, dequantized")
    model = short_model(rec["model"])
    return f"{model} ({note})" if note else model


def metric_columns(task: str, records: list[dict]) -> list[str]:
    if task in COLUMNS:
        return COLUMNS[task]
    cols: list[str] = []
    for rec in records:
        for k, v in rec["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in cols:
                cols.append(k)
    return cols[:MAX_GENERIC]


def _column(rec: dict, col: str):
    value = rec["metrics"].get(col)
    return rec["config"].get(col) if value is None and col in CONFIG_COLUMNS else value


def rows(records: list[dict]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """task -> (header, rows), records in time order."""
    by_task: dict[str, list[dict]] = {}
    for rec in sorted(records, key=lambda r: r["started_at"]):
        by_task.setdefault(rec["task"], []).append(rec)
    out = {}
    for task, recs in by_task.items():
        cols = metric_columns(task, recs)
        header = ["started", "engine", "model", "source", "precision", *cols, "status", "load", "commit", "file"]
        body = []
        for r in recs:
            env = r["environment"]
            body.append([r["started_at"][:16], r["backend"], r["model"], source(r), precision(r),
                         *[_fmt(_column(r, c)) for c in cols], r["status"],
                         _fmt(env.get("load_avg_1m")), str(env.get("git_commit")), r["_file"].split("/")[-1]])
        out[task] = (header, body)
    return out


# The page is rendered, so what the figures mean is written by hand elsewhere and linked
# (relative to results/README.md, where the page is kept).
NOTES = ("What these figures can and cannot tell you, and which machine measured them, is written by hand "
         "in [docs/measurements.md](../docs/measurements.md).")


def markdown(records: list[dict], title: str = "Measured records",
             charts: dict[str, list[tuple[str, str]]] | None = None) -> str:
    """The tables as Markdown; `charts` (task -> [(title, relative link)]) are embedded under their task."""
    lines = [f"# {title}", "",
             "Rendered by `billion report` from the JSON records in this folder; every figure was "
             "measured by this repository's code on the machine named in each record's `environment`.", "",
             NOTES, ""]
    chips = sorted({(r["environment"].get("chip"), r["environment"].get("os")) for r in records})
    lines += ["Machines: " + "; ".join(f"{c} ({o})" for c, o in chips), ""]
    for task, (header, body) in rows(records).items():
        lines += [f"## {task}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines.append("")
        for rec in sorted((r for r in records if r["task"] == task), key=lambda r: r["started_at"]):
            lines += record_table(rec)
        lines += [f"![{alt}]({link})\n" for alt, link in (charts or {}).get(task, [])]
    return "\n".join(lines)


def record_table(rec: dict) -> list[str]:
    """A record whose metrics hold a table (`rows`: a list of dicts, as peer_bench and the probes
    write) gets it rendered below its task's table; Markdown lines, or none."""
    table = rec["metrics"].get("rows")
    if not (isinstance(table, list) and table and all(isinstance(r, dict) for r in table)):
        return []
    cols = list(dict.fromkeys(k for r in table for k in r))
    return [f"{rec['_file'].split('/')[-1]}:", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols),
            *["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in table], ""]


# ---- charts: one function per chart, each drawing the newest complete record of every series ----

def _color(label: str) -> str | None:
    return next((c for engine, c in ENGINE_COLORS.items() if label.startswith(engine)), None)


def _grouped_bars(ax, categories: list[str], series: dict[str, dict[str, tuple]], horizontal: bool = False):
    """series: label -> {category: (value, error or None, text)}, side by side within each category,
    each bar with its text at its end. Returns label -> {category: bar centre}, and the bar width."""
    width = 0.8 / len(series)
    centres = {}
    for i, (label, values) in enumerate(series.items()):
        cats = [c for c in categories if c in values]
        at = [categories.index(c) - 0.4 + width * (i + 0.5) for c in cats]
        errs = [values[c][1] or 0 for c in cats]
        err = {("xerr" if horizontal else "yerr"): errs} if any(errs) else {}
        (ax.barh if horizontal else ax.bar)(at, [values[c][0] for c in cats], width, label=label,
                                            color=_color(label), capsize=3, **err)
        for pos, c, e in zip(at, cats, errs):
            end, text = values[c][0] + e, values[c][2]
            if horizontal:
                ax.text(end, pos, f" {text}", ha="left", va="center", fontsize=8)
            else:
                ax.text(pos, end, text, ha="center", va="bottom", fontsize=8)
        centres[label] = dict(zip(cats, at))
    (ax.set_yticks if horizontal else ax.set_xticks)(range(len(categories)), categories)
    return centres, width


def _plain_ticks(axis) -> None:
    """A log axis labelled 10 and 100 rather than 10^1 and 10^2."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))


def _ceiling(metrics: dict) -> float | None:
    if metrics.get("bandwidth_ceiling_tps"):
        return metrics["bandwidth_ceiling_tps"]
    frac = metrics.get("bandwidth_fraction")
    return metrics["decode_tps"] / frac if frac else None


def _bench_chart(fig, ax, chosen: dict) -> str:
    """One horizontal bar per engine and precision, grouped by comparable precision (`precision_group`)
    under a bold heading; each bar's ceiling a black tick, its figures in a column right of the axes."""
    from matplotlib.transforms import blended_transform_factory

    groups: dict[str, list] = {}
    for (engine, prec), r in sorted(chosen.items()):
        groups.setdefault(precision_group(prec), []).append((engine, prec, r))
    right = blended_transform_factory(ax.transAxes, ax.transData)  # x in axes, y in rows
    ticks, labels, headings, values, engines = [], [], [], [], set()
    row = 0
    for group in sorted(groups, key=_group_order):
        ticks.append(row)
        labels.append(group)
        headings.append(row)
        row += 1
        for engine, prec, r in groups[group]:
            tps, ceiling = r["metrics"]["decode_tps"], _ceiling(r["metrics"])
            ax.barh(row, tps, 0.7, color=_color(engine), label=None if engine in engines else engine)
            engines.add(engine)
            text = f"{tps:.3g} tok/s"
            if ceiling:
                ax.hlines(row, min(tps, ceiling), max(tps, ceiling), colors="grey", linestyles=":", linewidth=1)
                ax.plot([ceiling], [row], "k|", markersize=11, markeredgewidth=2,
                        label=None if any(v[1] for v in values) else "memory-bandwidth ceiling")
                text += f", {tps / ceiling:.1%} of ceiling"
            ax.text(1.02, row, text, transform=right, va="center", fontsize=8)
            values.append((tps, ceiling))
            ticks.append(row)
            labels.append(f"{engine} {prec}")
            row += 1
    ax.set_yticks(ticks, labels, fontsize=8)
    for tick in headings:
        label = ax.get_yticklabels()[ticks.index(tick)]
        label.set(fontweight="bold", fontsize=9)
        ax.axhline(tick, color="grey", linewidth=0.6, alpha=0.5)
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(row - 0.4, -0.6)  # first row on top
    every = [v for pair in values for v in pair if v]
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis)
    ax.set_xlim(min(every) / 2, max(every) * 2)
    ax.set_xlabel("decode tok/s (log scale)")
    ax.text(1.02, -0.6, "decode tok/s, share of\nthe bandwidth ceiling", transform=right, va="bottom",
            fontsize=8, style="italic")
    fig.set_size_inches(9, 1.6 + 0.24 * row)
    fig.get_layout_engine().set(w_pad=0.1, h_pad=0.08)
    fig.legend(fontsize=8, loc="outside lower center", ncols=len(engines) + 1, frameon=False)
    return "Decode tok/s per engine and precision, with the memory-bandwidth ceiling"


def _batch_size(rec: dict):
    return rec["config"].get("batch_size") or rec["metrics"].get("batch_size")


def _batch_series(rec: dict) -> str:
    """A batch line's name: the precision, and how the batch decoded (a prompt-lookup draft, the
    repetitive prompts its comparison runs use), so those runs are lines of their own."""
    config = rec["config"]
    return (precision(rec) + (f" {config['draft']}" if config.get("draft") else "")
            + (" (repetitive prompts)" if config.get("repetitive_prompts") else ""))


def _batch_chart(fig, ax, chosen: dict) -> str:
    """Aggregate decode tok/s against batch size: a line per engine and precision, a marker per size."""
    from matplotlib.ticker import NullLocator

    lines: dict[tuple, list] = {}
    for (engine, prec, size), r in chosen.items():
        lines.setdefault((engine, prec), []).append((size, r["metrics"]["aggregate_decode_tps"]))
    styles, markers = ("-", "--", "-.", ":"), "osD^v<>ph*"
    seen: dict[str, int] = {}
    for (engine, prec), points in sorted(lines.items(), key=lambda kv: (kv[0][0], _group_order(
            precision_group(kv[0][1])), kv[0][1])):
        i = seen[engine] = seen.get(engine, -1) + 1  # an engine's precisions: one colour, other lines
        points.sort()
        ax.plot([s for s, _ in points], [v for _, v in points], linestyle=styles[i % len(styles)],
                marker=markers[i % len(markers)], color=_color(engine), label=f"{engine} {prec}",
                linewidth=max(1.0, 2.2 - 0.5 * i), markersize=max(4.0, 8.0 - 1.5 * i))  # equal lines stay visible
    sizes = sorted({size for _, _, size in chosen})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(sizes[0] / 2 ** 0.3, sizes[-1] * 2 ** 0.3)
    tps = [v for points in lines.values() for _, v in points]
    if max(tps) / min(tps) > 20:  # engines decades apart
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
        ax.set_ylabel("aggregate decode tok/s (log scale)")
    else:
        ax.set_ylim(0, max(tps) * 1.1)
        ax.set_ylabel("aggregate decode tok/s")
    ax.set_xlabel("batch size (sequences decoded together, log scale)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return "Aggregate decode tok/s against batch size"


def _load_level(rec: dict):
    """A serve_bench record's load level: its concurrency or its request rate."""
    return rec["config"].get("concurrency") or rec["config"].get("request_rate")


def _serve_lines(chosen: dict, metric: str) -> dict[str, list]:
    """(server, model, load) -> record as {line label: [(load, metric)] in load order}; a line is a
    server, labelled with its model too when the chart holds one server name with several models
    (the title names the models)."""
    models = {}
    for server, model, _ in chosen:
        models.setdefault(server, set()).add(model)
    lines: dict[str, list] = {}
    for (server, model, load), r in sorted(chosen.items(), key=lambda kv: kv[0]):
        value = r["metrics"].get(metric)
        if value is not None:
            label = f"{server} ({short_model(model)})" if len(models[server]) > 1 else server
            lines.setdefault(label, []).append((load, value))
    return lines


def _serve_axes(ax, chosen: dict, ylabel: str, values: list[float]) -> str:
    """x: the load levels on a log-2 axis labelled as given; y from 0, or log when decades apart;
    the legend outside the data. Returns what x is, for the title."""
    from matplotlib.ticker import NullLocator

    loads = sorted({load for _, _, load in chosen})
    rate = "request_rate" in next(iter(chosen.values()))["config"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(loads, [f"{x:g}" for x in loads])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(loads[0] / 2 ** 0.3, loads[-1] * 2 ** 0.3)
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
        ylabel += " (log scale)"
    else:
        ax.set_ylim(0, max(values) * 1.1 or 1)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("request rate (requests/s, Poisson arrivals, log scale)" if rate
                  else "concurrency (requests in flight, log scale)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return "request rate" if rate else "concurrency"


def _serve_tps_chart(fig, ax, chosen: dict) -> str:
    """Output tok/s (over each point's wall time) against load: a line per server."""
    lines = _serve_lines(chosen, "output_tps")
    for i, (label, points) in enumerate(lines.items()):
        ax.plot(*zip(*points), "o-", color=_color(label) or f"C{len(ENGINE_COLORS) + i}", label=label)
    x = _serve_axes(ax, chosen, "output tok/s (all requests together)", [v for p in lines.values() for _, v in p])
    return f"Output tok/s against {x} ({next(iter(chosen.values()))['config'].get('workload')})"


def _serve_ttft_chart(fig, ax, chosen: dict) -> str:
    """TTFT p50 (solid) and p99 (dashed, the same colour) against load: two lines per server."""
    p99s, values = _serve_lines(chosen, "ttft_p99_s"), []
    for i, (label, p50) in enumerate(_serve_lines(chosen, "ttft_p50_s").items()):
        color, p99 = _color(label) or f"C{len(ENGINE_COLORS) + i}", p99s.get(label, [])
        ax.plot(*zip(*p50), "o-", color=color, label=f"{label} p50")
        if p99:
            ax.plot(*zip(*p99), "x--", color=color, label=f"{label} p99")
        values += [v for _, v in p50 + p99]
    x = _serve_axes(ax, chosen, "time to first token (s)", values)
    return f"TTFT p50 and p99 against {x} ({next(iter(chosen.values()))['config'].get('workload')})"


def _serve_chart(metric: str, draw: Callable, name: str) -> Chart:
    """A serve_bench chart: a line per server (and model) across load levels, one chart per workload
    (whichever models the servers ran), machine and kind of load (concurrency or rate)."""
    return Chart("serve_bench", lambda r: r["metrics"].get(metric) is not None and bool(_load_level(r)),
                 lambda r: (r["backend"], r["model"], _load_level(r)), draw,
                 lambda r: (str(r["environment"].get("chip")), "rate" if "request_rate" in r["config"]
                            else "concurrency"),
                 lambda r: (str(r["config"].get("workload")),), name)


def _finetune_chart(fig, ax, chosen: dict) -> str:
    for i, (engine, r) in enumerate(sorted(chosen.items())):
        hist, width = r["history"], max(1.0, 3.0 - 1.5 * i)  # the first engine wider: equal curves stay visible
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], "-", color=_color(engine), linewidth=width,
                label=f"{engine} train")
        val = [(h["step"], h["val_loss"]) for h in hist if h.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o--", color=_color(engine), linewidth=width, markersize=3 + 2 * width,
                    label=f"{engine} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    return "Fine-tuning loss"


def _mmlu_chart(fig, ax, chosen: dict) -> str:
    subjects = sorted({s for r in chosen.values() for s in r["subjects"]})
    series = {f"{engine} ({r['metrics'].get('questions')} questions)":
              {s: (v["acc"], v.get("acc_stderr"), f"{v['acc']:.2f}") for s, v in r["subjects"].items()}
              for engine, r in sorted(chosen.items())}
    _grouped_bars(ax, subjects, series, horizontal=True)
    ax.set_yticklabels([s.replace("_", " ") for s in subjects])
    ax.invert_yaxis()
    ax.axvline(0.25, color="grey", linestyle=":", label="chance (0.25)")
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("accuracy")
    fig.set_size_inches(8, 1.8 + 0.25 * len(subjects) * len(series))
    shots = next(iter(chosen.values()))["config"].get("shots", 0)
    return f"MMLU accuracy per subject, {shots}-shot"


def _speculate_chart(fig, ax, chosen: dict) -> str:
    ks: set[int] = set()
    for (engine, draft), r in sorted(chosen.items()):
        per_k = sorted((int(k), v) for k, v in r["metrics"]["per_k"].items())
        ks.update(k for k, _ in per_k)
        ax.plot([k for k, _ in per_k], [v["speedup"] for _, v in per_k], "o-", color=_color(engine),
                label=f"{engine} measured (draft {draft})")
        ax.plot([k for k, _ in per_k], [v.get("predicted_speedup") for _, v in per_k], "x--",
                color=_color(engine), label=f"{engine} predicted")
    ax.axhline(1, color="grey", linestyle=":", label="no speedup")
    ax.set_xticks(sorted(ks))
    ax.set_xlabel("draft tokens per round (k)")
    ax.set_ylabel("speedup over the target alone")
    return "Speculative decoding speedup against k"


def _quality_chart(fig, ax, chosen: dict) -> str:
    series: dict[str, dict[str, tuple]] = {}
    for (engine, prec), r in sorted(chosen.items()):
        kl = r["metrics"]["mean_kl"]
        series.setdefault(engine, {})[prec] = (kl, r["metrics"].get("mean_kl_stderr"), f"{kl:.3g}")
    _grouped_bars(ax, sorted({p for _, p in chosen}), series)
    kls = [r["metrics"]["mean_kl"] for r in chosen.values()]
    log = min(kls) > 0  # int8 and int4 lie decades apart
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(kls) / 3, max(kls) * 3)
    ax.set_ylabel("mean KL(full || quantized)" + (" (log scale)" if log else ""))
    ax.set_xlabel("quantization")
    return "Quantization KL per precision"


class Chart(NamedTuple):
    task: str
    usable: Callable[[dict], bool]  # the record carries what the chart needs
    series: Callable[[dict], object]  # one bar or line per value; the newest complete record wins
    draw: Callable  # (figure, axes, {series: record}) -> what the chart shows
    split: Callable[[dict], tuple] = lambda r: ()  # one chart per value, within a model
    # what one chart holds, before split: a model and its weights' source, unless said otherwise
    group: Callable[[dict], tuple] = lambda r: (r["model"], source(r))
    name: str = ""  # tells apart the files of charts drawn from the same records


CHARTS = (
    Chart("bench", lambda r: (r["metrics"].get("decode_tps") or 0) > 0,
          lambda r: (r["backend"], precision(r)), _bench_chart),
    Chart("bench_batch", lambda r: (r["metrics"].get("aggregate_decode_tps") or 0) > 0 and bool(_batch_size(r)),
          lambda r: (r["backend"], _batch_series(r), int(_batch_size(r))), _batch_chart,
          lambda r: (str(r["environment"].get("chip")),)),  # one chart per machine
    Chart("finetune", lambda r: bool(r.get("history")), lambda r: r["backend"], _finetune_chart),
    Chart("mmlu", lambda r: bool(r.get("subjects")), lambda r: r["backend"], _mmlu_chart,
          lambda r: (f"{r['config'].get('shots', 0)}-shot",)),
    Chart("speculate", lambda r: bool(r["metrics"].get("per_k")),
          lambda r: (r["backend"], str(r["config"].get("draft"))), _speculate_chart),
    Chart("quality", lambda r: r["metrics"].get("mean_kl") is not None,
          lambda r: (r["backend"], precision(r)), _quality_chart),
    _serve_chart("output_tps", _serve_tps_chart, "tps"),
    _serve_chart("ttft_p50_s", _serve_ttft_chart, "ttft"),
)


def groups(records: list[dict], chart: Chart) -> dict[tuple, dict]:
    """(*group, *split) -> {series: the newest complete record of that series}; group is (model, source)
    unless the chart says otherwise."""
    out: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r["started_at"]):
        if r["task"] == chart.task and r["status"] == "complete" and chart.usable(r):
            out.setdefault((*chart.group(r), *chart.split(r)), {})[chart.series(r)] = r
    return out


def figure(chart: Chart, chosen: dict):
    """Draw one chart (Agg); returns (the matplotlib Figure, its title on one line)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    what = chart.draw(fig, ax, chosen)
    recs = list(chosen.values())
    chips = ", ".join(sorted({str(r["environment"].get("chip")) for r in recs}))
    subject = f"{', '.join(dict.fromkeys(model_title(r) for r in recs))} on {chips}"
    # a chart of several servers names each one's model: wrapped, so the plot keeps its width
    ax.set_title("\n".join([what, *textwrap.wrap(subject, 100)]), fontsize=10)
    if ax.get_legend() is None and not fig.legends:  # a chart may have placed its own, outside its data
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig, f"{what}: {subject}"


def _save(chart: Chart, chosen: dict, path: Path) -> str:
    """Draw one chart as a PNG at path; returns its title on one line."""
    fig, title = figure(chart, chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return title


def charts(records: list[dict], md_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Draw every chart the records allow as md_dir/charts/*.png; task -> [(title, link relative to md_dir)]."""
    from billion.records.store import _slug

    out: dict[str, list[tuple[str, str]]] = {}
    for chart in CHARTS:
        for key, chosen in groups(records, chart).items():
            link = f"{CHARTS_DIR}/{chart.task}-{_slug(' '.join(key))}.png"
            if chart.name:  # several charts of these records, and keys longer than a slug keeps: a hash
                digest = hashlib.sha1("\0".join(key).encode()).hexdigest()[:8]
                link = f"{CHARTS_DIR}/{chart.task}-{chart.name}-{_slug(' '.join(key))[:40].strip('-')}-{digest}.png"
            out.setdefault(chart.task, []).append((_save(chart, chosen, md_dir / link), link))
    return out
