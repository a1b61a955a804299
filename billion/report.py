"""Render records (JSON files under results/) as tables: on screen or as Markdown."""

from __future__ import annotations

# The metrics worth a column, per task; other tasks show their first numeric metrics.
COLUMNS = {
    "bench": ["prefill_tps", "ttft_s", "decode_tps", "bandwidth_fraction", "weight_gb", "peak_memory_gb"],
    "parity": ["positions", "top1_agreement", "max_abs_logit_diff", "mean_kl", "first_greedy_divergence"],
    "overhead": ["billion_s", "library_s", "ratio"],
    "quality": ["positions", "mean_kl", "median_kl", "p99_kl", "max_kl", "top1_agreement", "ppl_full", "ppl_quant"],
}
MAX_GENERIC = 6


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def metric_columns(task: str, records: list[dict]) -> list[str]:
    if task in COLUMNS:
        return COLUMNS[task]
    cols: list[str] = []
    for rec in records:
        for k, v in rec["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in cols:
                cols.append(k)
    return cols[:MAX_GENERIC]


def rows(records: list[dict]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """task -> (header, rows), records in time order."""
    by_task: dict[str, list[dict]] = {}
    for rec in sorted(records, key=lambda r: r["started_at"]):
        by_task.setdefault(rec["task"], []).append(rec)
    out = {}
    for task, recs in by_task.items():
        cols = metric_columns(task, recs)
        header = ["started", "engine", "model", "precision", *cols, "status", "load", "commit", "file"]
        body = []
        for r in recs:
            env = r["environment"]
            dtype = (r.get("model_info") or {}).get("dtype") or r["config"].get("dtype") or "-"
            if r["config"].get("quantize"):
                dtype = r["config"]["quantize"] if dtype == "-" else f"{dtype} {r['config']['quantize']}"
            body.append([r["started_at"][:16], r["backend"], r["model"], str(dtype),
                         *[_fmt(r["metrics"].get(c)) for c in cols], r["status"],
                         _fmt(env.get("load_avg_1m")), str(env.get("git_commit")), r["_file"].split("/")[-1]])
        out[task] = (header, body)
    return out


def markdown(records: list[dict], title: str = "Measured records") -> str:
    lines = [f"# {title}", "",
             "Rendered by `billion report` from the JSON records in this folder; every figure was "
             "measured by this repository's code on the machine named in each record's `environment`.", ""]
    chips = sorted({(r["environment"].get("chip"), r["environment"].get("os")) for r in records})
    lines += ["Machines: " + "; ".join(f"{c} ({o})" for c, o in chips), ""]
    for task, (header, body) in rows(records).items():
        lines += [f"## {task}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines.append("")
    return "\n".join(lines)
