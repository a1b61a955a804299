"""`billion report`: tables (and, with --markdown, PNG charts; with --html, one self-contained page)
rendered from JSON records."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from backends.types import UserError
from billion.ui import console


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the tables as Markdown to this file (e.g. results/README.md).")
@click.option("--charts/--no-charts", "draw_charts", default=True, show_default=True,
              help="With --markdown: also draw PNG charts into charts/ next to the Markdown file and link them.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), default=None,
              help="Also write one self-contained HTML page (tables, inline SVG charts, filters; nothing fetched).")
@click.option("--task", default=None, help="Only records of this task (bench, parity, mmlu, ...).")
def report(paths, markdown_out, draw_charts, html_out, task):
    """Show the records under PATHS (default: results/) as one table per task."""
    from billion.records.report import CHARTS_DIR, charts, markdown, rows
    from billion.records.store import read_records

    records = read_records(paths or ["results"])
    if task:
        records = [r for r in records if r["task"] == task]
    if not records:
        console.print("no records found")
        return
    for name, (header, body) in rows(records).items():
        table = Table(title=name)
        for col in header[:-1]:  # the file name column is for the Markdown version
            table.add_column(col)
        for row in body:
            table.add_row(*row[:-1])
        console.print(table)
    if markdown_out:
        out = Path(markdown_out)
        drawn = charts(records, out.parent) if draw_charts else {}
        out.write_text(markdown(records, charts=drawn))
        count = sum(map(len, drawn.values()))
        console.print(f"wrote {markdown_out}" + (f" and {count} charts in {out.parent / CHARTS_DIR}" if count else ""))
    if html_out:
        from billion.records.html import page

        try:
            Path(html_out).write_text(page(records))
        except OSError as e:
            raise UserError(f"{html_out}: cannot write the page ({e.strerror or e})") from None
        console.print(f"wrote {html_out}")
