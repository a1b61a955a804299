"""Clients that hang up: does their work stop? 20 clients send a long request and close their
connection, then a short request is timed against its time alone (the probe of issue 30).

For each engine (-b), answer kind (JSON and SSE) and state the clients leave in:

  queued      closed at once (0.05 s): most still wait for one of the 8 slots (--parallel 8)
  prefilling  prompts of --long-prompt tokens, closed --prefill-close-s after sending
  decoding    closed after --decode-close-s (the issue's probe: 0.5 s)

the short request (16 tokens, greedy) is sent --gap-s after the close; its latency over its median
alone is the ratio (1.0: the abandoned work is gone; before the fix, non-streaming clients made it
wait for every abandoned request to run to the end). Starts `billion serve` itself on 127.0.0.1.

    .venv/bin/python scripts/abandoned_clients.py -b torch           # the real SmolLM2-135M
    .venv/bin/python scripts/abandoned_clients.py -m tiny:tinyllama   # a smoke run

Prints a table and writes an `abandoned_clients` record under --results-dir.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx

from billion.records.store import make_record, write_record
from soak import start_server  # scripts/soak.py, beside this file

STATES = ("queued", "prefilling", "decoding")


def send(url: str, body: dict, n: int) -> list[http.client.HTTPConnection]:
    where = urlsplit(url)
    conns = []
    for _ in range(n):
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        conns.append(conn)
    return conns


def hang_up(conns) -> None:
    for conn in conns:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def short(url: str, model: str) -> float:
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", timeout=600, json={"model": model, "prompt": "The capital of France is",
                                                               "max_tokens": 16, "ignore_eos": True, "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - start


def idle(url: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while any(httpx.get(url + "/health", timeout=30).json()["requests"].values()):
        if time.time() > deadline:
            raise SystemExit("the server never became idle")
        time.sleep(0.2)


def probe(url: str, model: str, state: str, stream: bool, args) -> dict:
    idle(url)
    alone = statistics.median(short(url, model) for _ in range(3))
    prompt = "a" if state != "prefilling" else "The history of the sea. " * (args.long_prompt // 6)
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": True, "stream": stream}
    conns = send(url, body, args.clients)
    time.sleep({"queued": 0.05, "prefilling": args.prefill_close_s, "decoding": args.decode_close_s}[state])
    hang_up(conns)
    time.sleep(args.gap_s)
    after = short(url, model)
    return {"model": model, "state": state, "stream": stream, "alone_s": round(alone, 3), "after_s": round(after, 3),
            "ratio": round(after / alone, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", default="gguf:smollm2-135m")
    p.add_argument("--backend", "-b", default="torch")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--long-prompt", type=int, default=1500, help="tokens (about) of the prefilling state's prompts")
    p.add_argument("--prefill-close-s", type=float, default=0.2)
    p.add_argument("--decode-close-s", type=float, default=0.5)
    p.add_argument("--gap-s", type=float, default=2.0)
    p.add_argument("--serve-arg", action="append", default=[], help="one more billion serve argument (repeatable)")
    p.add_argument("--results-dir", default="results")
    args = p.parse_args()
    started = time.time()
    serve = SimpleNamespace(model=args.model, backend=args.backend, parallel=8, serve_arg=args.serve_arg)
    proc, url, _ = start_server(serve)
    rows = []
    try:
        models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"] if "@" in m["id"]]
        for model in models:
            for state in STATES:
                for stream in (False, True):
                    rows.append(probe(url, model, state, stream, args))
                    r = rows[-1]
                    print(f"{r['model']:<28} {state:<11} {'sse' if stream else 'json':<5} alone {r['alone_s']:7.3f} s"
                          f"  after {r['after_s']:7.3f} s  x{r['ratio']}", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio: {worst}")
    config = {k: getattr(args, k) for k in ("clients", "max_tokens", "long_prompt", "prefill_close_s",
                                            "decode_close_s", "gap_s", "serve_arg")}
    record = make_record("abandoned_clients", args.backend, args.model, config, {"worst_ratio": worst, "rows": rows},
                         started=started)
    print(f"record: {write_record(record, args.results_dir)}")


if __name__ == "__main__":
    main()
