"""The peer's figures for structured output: llama.cpp's own llama-server, on the same weights and
the same 26 schemas as scripts/structured_bench.py, with and without `response_format`
json_schema (llama.cpp turns the schema into a GBNF grammar and samples under it).

Each schema's prompt (the same system message and user text as structured_bench) is sent
greedily, at most --max-tokens, one request at a time, unconstrained and constrained in turn.
Reported: the valid-output rate (structured_bench.check: json.loads + jsonschema with formats),
and from llama-server's own `timings` the median decode time per token of each mode and their
ratio: what the grammar costs llama.cpp per token. The GGUF is llama.cpp's own F32 conversion of
the folder billion loads (as scripts/serve_vs_llama_server.sh), served on 127.0.0.1 only with one
slot and every core.

    bash scripts/setup_llamacpp.sh --tools      # once: llama-server
    OMP_NUM_THREADS=2 .venv/bin/python scripts/structured_vs_llama_server.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_overhead import free_port  # noqa: E402
from structured_bench import SCHEMAS, SYSTEM, check, rate  # noqa: E402


def post(url: str, body: dict) -> dict:
    """The reply, or {"error": message} for a 4xx (a schema llama.cpp refuses)."""
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise
        return {"error": e.read().decode(errors="replace")[:300]}


def wait_up(url: str, proc: subprocess.Popen) -> None:
    for _ in range(240):
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("llama-server did not come up")


def gguf(model: str, version: str) -> Path:
    from backends.llamacpp_engine.convert import gguf_file
    from billion.loading import resolve

    return gguf_file(resolve(model, progress=False).folder, version, "float32", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gguf:smollm2-135m")
    ap.add_argument("--llama-cpp-version", default="0.3.36")
    ap.add_argument("--server", default=None, help="llama-server (default: $BILLION_HOME/llama.cpp-<version>/bin)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--limit", type=int, default=None, help="only the first N schemas")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    home = Path(os.environ.get("BILLION_HOME", Path.home() / ".cache" / "billion"))
    server = args.server or str(home / f"llama.cpp-{args.llama_cpp_version}" / "bin" / "llama-server")
    if not os.access(server, os.X_OK):
        raise SystemExit(f"no llama-server at {server}: bash scripts/setup_llamacpp.sh --tools")
    items = json.loads(SCHEMAS.read_text())[: args.limit]
    path, port = gguf(args.model, args.llama_cpp_version), free_port()
    url = f"http://127.0.0.1:{port}"
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    proc = subprocess.Popen([server, "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-np", "1",
                             "-c", "2048", "-t", threads], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {"unconstrained": [], "constrained": []}
    try:
        wait_up(url, proc)
        for item in items:
            messages = [{"role": "system", "content": SYSTEM.format(schema=json.dumps(item["schema"]))},
                        {"role": "user", "content": item["prompt"]}]
            for mode in results:
                body = {"model": "x", "messages": messages, "temperature": 0, "max_tokens": args.max_tokens}
                if mode == "constrained":
                    body["response_format"] = {"type": "json_schema",
                                               "json_schema": {"name": item["name"], "schema": item["schema"]}}
                reply = post(url, body)
                if "error" in reply:
                    results[mode].append({"name": item["name"], "refused": reply["error"], "problem": "refused",
                                          "ms_per_token": None, "finish": None, "text": ""})
                    continue
                text = reply["choices"][0]["message"]["content"] or ""
                timings = reply.get("timings", {})
                results[mode].append({"name": item["name"], "text": text, "finish": reply["choices"][0]["finish_reason"],
                                      "tokens": timings.get("predicted_n"),
                                      "ms_per_token": timings.get("predicted_per_token_ms"),
                                      "problem": check(text, item["schema"], lenient=mode == "unconstrained")})
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"llama-server {server} on {path.name} (F32), {threads} threads, 1 slot, greedy, "
          f"max_tokens {args.max_tokens}, {len(items)} schemas")
    summary = {}
    for mode, rows in results.items():
        valid = sum(r["problem"] is None for r in rows)
        ms = statistics.median(r["ms_per_token"] for r in rows if r["ms_per_token"])
        summary[mode] = {"valid": valid, "total": len(rows), "median_ms_per_token": ms}
        print(f"{mode:14s} valid {rate(valid, len(rows))}  decode {ms:.2f} ms/token (median over requests)"
              + ("  (lenient: fences stripped, first { to last })" if mode == "unconstrained" else ""))
    ratio = summary["constrained"]["median_ms_per_token"] / summary["unconstrained"]["median_ms_per_token"]
    print(f"constrained / unconstrained decode time per token: {ratio:.3f}")
    for r in results["constrained"]:
        if r.get("refused"):
            print(f"  constrained {r['name']}: refused: {r['refused']}")
        elif r["problem"]:
            print(f"  constrained {r['name']}: {r['finish']} {r['problem']}: {r['text'][:80]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "ratio": ratio, "results": results}, indent=1))


if __name__ == "__main__":
    main()
