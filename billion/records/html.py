"""The records as one self-contained HTML page: `billion report --html FILE`, and `/report` of
`billion serve --results DIR`.

The same tables and charts as the Markdown report (report.py decides what they hold), with each
chart drawn by matplotlib as inline SVG (its text as paths, so no font is fetched) and a little
inline script that filters rows and charts by model, engine and precision. Nothing is loaded from
elsewhere: the file opens offline, mailed or archived, as it was written.
"""

from __future__ import annotations

import html
import io

from billion.records.report import CHARTS, figure, groups, precision, rows

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.filters { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #eee; z-index: 1; }
.filters label { margin-right: 1em; } .filters select { max-width: 22em; }
nav { margin-top: .4em; font-size: 12px; } nav a { margin-right: .8em; white-space: nowrap; display: inline-block; }
section { scroll-margin-top: 6em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; white-space: nowrap; }
th { background: #f5f5f5; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 12px; color: #555; }
.hidden { display: none; }
"""

# Filters rows (tr[data-model], ...) and charts (figure[data-model], data-engines and
# data-precisions as space-separated lists) by the three selects; empty means any.
SCRIPT = """
const selects = [...document.querySelectorAll('.filters select')];
function matches(el, key, value) {
  if (!value) return true;
  const have = el.dataset[key];
  return key === 'model' ? have === value : have.split(' ').includes(value);
}
function apply() {
  const wanted = Object.fromEntries(selects.map(s => [s.name, s.value]));
  for (const el of document.querySelectorAll('[data-model]')) {
    const show = matches(el, 'model', wanted.model) && matches(el, 'engines', wanted.engine)
      && matches(el, 'precisions', wanted.precision);
    el.classList.toggle('hidden', !show);
  }
  for (const section of document.querySelectorAll('section[data-task]')) {
    section.classList.toggle('hidden', !section.querySelector('[data-model]:not(.hidden)'));
  }
}
selects.forEach(s => s.addEventListener('change', apply));
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _chart_svgs(records: list[dict]) -> dict[str, list[str]]:
    """task -> its charts, each a <figure> holding inline SVG, tagged for the filters."""
    out: dict[str, list[str]] = {}
    for chart in CHARTS:
        for key, chosen in groups(records, chart).items():
            fig, title = figure(chart, chosen)
            buffer = io.StringIO()
            fig.savefig(buffer, format="svg")
            svg = buffer.getvalue()
            svg = svg[svg.index("<svg"):]  # no XML prolog or DOCTYPE inside the page
            recs = list(chosen.values())
            engines = " ".join(sorted({e for r in recs for e in _engines(r)}))
            precisions = " ".join(sorted({_precision_key(r) for r in recs}))
            out.setdefault(chart.task, []).append(
                f'<figure data-model="{_e(key[0])}" data-engines="{_e(engines)}" '
                f'data-precisions="{_e(precisions)}">{svg}<figcaption>{_e(title)}</figcaption></figure>')
    return out


def _precision_key(rec: dict) -> str:
    """The record's precision as one word (a filter's value: `float32_int8`)."""
    return precision(rec).replace(" ", "_")


def _engines(rec: dict) -> list[str]:
    """The engines a record ran: one, or several for a comparison (`mlx,torch`)."""
    return rec["backend"].split(",")


def _select(name: str, label: str, values: set[str]) -> str:
    options = "".join(f'<option value="{_e(v)}">{_e(v.replace("_", " "))}</option>' for v in sorted(values))
    return f'<label>{label} <select name="{name}"><option value="">any</option>{options}</select></label>'


def page(records: list[dict], title: str = "billion: measured records") -> str:
    """The whole page for `records` (as store.read_records gives them), as one HTML string."""
    charts = _chart_svgs(records)
    tables = rows(records)
    chips = sorted({(str(r["environment"].get("chip")), str(r["environment"].get("os"))) for r in records})
    parts = [f"<h1>{_e(title)}</h1>",
             "<p>Rendered by <code>billion report --html</code> from JSON records; every figure was measured by "
             "billion's code on the machine named in each record's <code>environment</code>. "
             "What these figures can and cannot tell you is written by hand in billion's "
             "<code>docs/measurements.md</code>.</p>",
             f"<p>{len(records)} records. Machines: {_e('; '.join(f'{c} ({o})' for c, o in chips))}</p>",
             '<div class="filters">'
             + _select("model", "model", {r["model"] for r in records})
             + _select("engine", "engine", {e for r in records for e in _engines(r)})
             + _select("precision", "precision", {_precision_key(r) for r in records})
             + "<nav>sections: " + "".join(f'<a href="#{_e(task)}">{_e(task)}</a>' for task in tables)
             + "</nav></div>"]
    by_task: dict[str, list[dict]] = {}
    for rec in sorted(records, key=lambda r: r["started_at"]):  # rows() keeps this order too
        by_task.setdefault(rec["task"], []).append(rec)
    for task, (header, body) in tables.items():
        lines = [f'<section data-task="{_e(task)}" id="{_e(task)}"><h2>{_e(task)}</h2><div class="scroll"><table><thead><tr>'
                 + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
        for rec, row in zip(by_task[task], body):
            lines.append(f'<tr data-model="{_e(rec["model"])}" data-engines="{_e(" ".join(_engines(rec)))}" '
                         f'data-precisions="{_e(_precision_key(rec))}">'
                         + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>")
        lines.append("</tbody></table></div>")
        lines += charts.get(task, [])
        lines.append("</section>")
        parts.append("\n".join(lines))
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts)
            + f"\n<script>{SCRIPT}</script></body></html>\n")


def empty_page(where: str) -> str:
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>billion: no records</title>"
            f"</head><body><p>No records in {_e(where)} yet: run a benchmark or an evaluation with "
            f"<code>--results {_e(where)}</code>.</p></body></html>\n")
