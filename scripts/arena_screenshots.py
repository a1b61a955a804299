"""The arena page on the real model: screenshots for the docs, and how far the page's time to first
token (Enter pressed to the token painted) lies from the server's own (request arrival to first
token, its Server-Timing header), per engine.

    .venv/bin/python scripts/arena_screenshots.py -m gguf:smollm2-135m --runs 5

Starts `billion serve -b all` (both engines on the same weights, --results results for /report),
drives Debian's Chromium through Playwright, saves docs/images/arena-*.png and report.png, prints
the latency table and writes it as an `arena_latency` record. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import start_server  # noqa: E402  scripts/soak.py, beside this file

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "billion" / "server" / "page"
QUESTION = "What is the capital of France? Answer briefly."


def page_weight() -> dict:
    files = sorted(PAGE.iterdir())
    raw = sum(f.stat().st_size for f in files)
    zipped = sum(len(gzip.compress(f.read_bytes())) for f in files)
    return {"files": len(files), "bytes": raw, "gzip_bytes": zipped}


def columns(page) -> list[dict]:
    return page.evaluate("""() => [...document.querySelectorAll('.column')].map(c => {
        const m = [...c.querySelectorAll('.metrics')].at(-1);
        return {model: c.dataset.model, ttft: Number(m.dataset.ttft), server: Number(m.dataset.serverTtft),
                count: Number(m.dataset.count), finish: m.dataset.finish};
    })""")


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelector('#stop').disabled", timeout=600_000)


def settings(page, **values) -> None:
    if not page.is_visible("#settings .grid"):
        page.click("#settings summary")
    for name, value in values.items():
        page.fill(f"#settings [name={name}]", str(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gguf:smollm2-135m")
    parser.add_argument("--runs", type=int, default=5, help="greedy questions timed per engine")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--images", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--results-dir", default=str(ROOT / "results"))
    parser.add_argument("--chromium", default=os.environ.get("BILLION_CHROMIUM") or shutil.which("chromium"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from billion.loading import resolve
    from billion.records.store import make_record, write_record

    images = Path(args.images)
    images.mkdir(parents=True, exist_ok=True)
    serve = SimpleNamespace(model=args.model, backend="all", parallel=4,
                            serve_arg=["--results", args.results_dir])
    proc, url, _log = start_server(serve)
    timings = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            page.goto(url + "/")
            page.wait_for_selector(".column")
            settings(page, temperature=0, max_tokens=args.max_tokens)
            page.click("#settings summary")  # closed again: the columns get the room
            for i in range(args.runs):
                ask(page, QUESTION if i == 0 else f"{QUESTION} ({i + 1})")
                timings.append(columns(page))
            page.click("#new-chat")
            ask(page, QUESTION)
            page.screenshot(path=str(images / "arena-side-by-side.png"))
            page.click("#settings summary")
            settings(page, temperature=1.0)
            page.click("#settings summary")
            page.click("#new-chat")
            for _ in range(5):  # sampled replies part somewhere; a rare pair that does not is asked again
                ask(page, "Write one sentence about the sea.")
                if page.query_selector(".tok.diverge"):
                    break
            page.screenshot(path=str(images / "arena-divergence.png"))
            token = page.query_selector(".column >> nth=1 >> .tok:not(:empty) >> nth=3")
            token.hover()
            page.wait_for_selector("#tip:not([hidden])")
            page.screenshot(path=str(images / "arena-alternatives.png"))
            page.goto(url + "/report")
            page.select_option("select[name=model]", args.model)
            page.locator("section#bench figure:not(.hidden)").first.scroll_into_view_if_needed()  # below the sticky filters
            page.screenshot(path=str(images / "report.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(60)
    rows = []
    for model in [c["model"] for c in timings[0]]:
        runs = [c for t in timings for c in t if c["model"] == model]
        gaps = [c["ttft"] - c["server"] for c in runs]
        rows.append({"model": model, "runs": len(runs), "page_ttft_ms_median": statistics.median(c["ttft"] for c in runs),
                     "server_ttft_ms_median": statistics.median(c["server"] for c in runs),
                     "gap_ms_median": statistics.median(gaps), "gap_ms_max": max(gaps)})
    weight = page_weight()
    for row in rows:
        print(f"{row['model']}: page TTFT {row['page_ttft_ms_median']:.0f} ms, server {row['server_ttft_ms_median']:.0f}"
              f" ms, gap median {row['gap_ms_median']:.1f} ms (max {row['gap_ms_max']:.1f}) over {row['runs']} runs")
    print(f"page: {weight['files']} files, {weight['bytes']} bytes ({weight['gzip_bytes']} gzipped)")
    record = make_record("arena_latency", "mlx,torch", args.model, {"runs": args.runs, "max_tokens": args.max_tokens,
                                                              "temperature": 0, "browser": "chromium headless"},
                         {"rows": rows, "page_bytes": weight["bytes"], "page_gzip_bytes": weight["gzip_bytes"]},
                         started=time.time(), source=resolve(args.model, progress=False).source)
    print("wrote", write_record(record, args.results_dir))


if __name__ == "__main__":
    main()
