"""Careless and hostile requests against a running OpenAI-compatible server on localhost: the status
each gets, how long it took, and whether the server still answers /health and a good request after.

One request per class of issue 23's list (sampling overflow, client mistakes the JSON parser or
the validation should refuse, fields the server does not implement, a large body, foreign Host
and Origin headers, a form post); bounded: one request each, 30 s at most. Loopback URLs only.

    .venv/bin/billion serve -m tiny:tinyllama -b torch --port 8090 &
    .venv/bin/python scripts/hostile_requests.py --url http://127.0.0.1:8090
"""

from __future__ import annotations

import argparse
import json
import time

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx

from backends.types import UserError
from billion.tasks.serve_bench import check_loopback


def nested_schema(depth: int) -> dict:
    """An object schema nested `depth` levels deep (a grammar far larger than any reply needs)."""
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def cases(model: str) -> list[tuple[str, dict]]:
    ok = {"model": model, "prompt": "Once upon a time", "max_tokens": 4}
    raw = lambda body: {"content": body, "headers": {"Content-Type": "application/json"}}  # noqa: E731
    js = lambda body, **h: {"json": body, "headers": h}  # noqa: E731
    return [
        ("temperature 1e-30", js({**ok, "temperature": 1e-30})),
        ("repetition_penalty 1e-30", js({**ok, "repetition_penalty": 1e-30, "temperature": 0.7})),
        ("negative seed", js({**ok, "seed": -1, "temperature": 0.7})),
        ("top_k -1 (off)", js({**ok, "top_k": -1})),
        ("5000-digit integer", raw(b'{"model": "%s", "prompt": "hi", "max_tokens": 1' % model.encode()
                                   + b"0" * 5000 + b"}")),
        ("100000-deep nesting", raw(b"[" * 100000 + b"]" * 100000)),
        ("NaN temperature", raw(b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % model.encode())),
        ("unenforceable schema", js({**ok, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "uniqueItems": True}}}})),
        ("schema nested 400 deep", js({**ok, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": nested_schema(400)}}})),
        ("tools on completions", js({**ok, "tools": [{"type": "function", "function": {"name": "f"}}]})),
        ("logprobs 2", js({**ok, "logprobs": 2})),
        ("n 17", js({**ok, "n": 17})),
        ("16 MiB body", raw(b'{"prompt": "' + b"a" * (16 * 2**20) + b'"}')),
        ("Host evil.example", js(ok, Host="evil.example")),
        ("Origin evil.example", js(ok, Origin="http://evil.example")),
        ("form post", {"content": b"model=x&prompt=hi",
                       "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8090")
    ap.add_argument("--json", action="store_true", help="One JSON line per case instead of a table.")
    args = ap.parse_args()
    try:
        check_loopback(args.url)
    except UserError as e:
        raise SystemExit(str(e)) from None
    model = httpx.get(args.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    for name, kw in cases(model):
        start = time.perf_counter()
        try:
            r = httpx.post(args.url + "/v1/completions", timeout=30, **kw)
            status, body = r.status_code, r.text[:120].replace("\n", " ")
        except httpx.HTTPError as e:
            status, body = None, f"{type(e).__name__}: {e}"[:120]
        took = time.perf_counter() - start
        try:
            up = httpx.get(args.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            up = False
        row = {"case": name, "status": status, "seconds": round(took, 3), "server_up": up, "answer": body}
        print(json.dumps(row) if args.json else f"{name:32} {status!s:>5} {took:7.3f} s  up={up}  {body[:70]}")
    good = httpx.post(args.url + "/v1/completions", json={"model": model, "prompt": "Once upon a time",
                                                          "max_tokens": 4}, timeout=30)
    print(f"a good request after them: {good.status_code}, "
          f"{good.json().get('usage', {}).get('completion_tokens')} tokens")


if __name__ == "__main__":
    main()
