"""Load benchmark of a running `billion serve`: N concurrent streamed requests on localhost.

Sends --requests streamed /v1/completions requests at once (at most --concurrency in flight),
each asking for exactly --max-tokens tokens (ignore_eos), and checks that each one got them
(the usage chunk's completion_tokens). Measures time to first token per request (from sending
the request to the first text event: it includes any wait for a free slot of the server's batch),
request latency, and total generated tokens/s
over the wall time of the whole batch. Bounded: a fixed number of requests and an overall
--timeout; only loopback URLs are accepted.

    .venv/bin/billion serve -m gguf:smollm2-135m -b torch &
    .venv/bin/python scripts/serve_load.py --url http://127.0.0.1:8080 --requests 32 --max-tokens 64
    .venv/bin/python scripts/serve_load.py --requests 4 --max-tokens 8          # smoke run

Writes one `serve_load` record under --results-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import time
from urllib.parse import urlparse

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx
import numpy as np

from billion.records.store import make_record, write_record


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host != "localhost":
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
        raise SystemExit(f"refusing to load-test {host!r}: only loopback addresses (127.0.0.1, ::1, localhost)")


async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, body: dict) -> dict:
    async with gate:
        sent = time.perf_counter()
        first, usage, text, error = None, None, [], None
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]["message"]
                        break
                    for choice in event.get("choices", []):
                        if choice.get("text"):
                            first = first or time.perf_counter()
                            text.append(choice["text"])
                    usage = event.get("usage") or usage
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        done = time.perf_counter()
        tokens = (usage or {}).get("completion_tokens")
        ok = error is None and tokens == body["max_tokens"]
        return {"ok": ok, "error": error or (None if ok else f"got {tokens} tokens, asked {body['max_tokens']}"),
                "ttft_s": (first - sent) if first else None, "latency_s": done - sent, "tokens": tokens or 0}


def served_source(model_id: str) -> dict | None:
    """Where the served model's weights came from, for the record (ResolvedModel.source): the id's
    spec (before "@<engine>") resolved when its folder is local -- a GGUF file's conversion, random
    or tiny weights, a folder, all already built by the server on this machine --; None for a Hub id
    (no network for a record) or an id that is not a spec."""
    from backends.types import UserError
    from billion.loading import ResolvedModel, model_folder
    from billion.models import parse_spec

    try:
        spec = parse_spec(model_id.rpartition("@")[0] or model_id)
        if spec.kind not in ("gguf", "random", "tiny", "folder"):
            return None
        return ResolvedModel(spec, model_folder(spec, progress=False)).source
    except (UserError, OSError, ValueError):
        return None


async def run(args) -> tuple[list[dict], float, str]:
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        gate = asyncio.Semaphore(args.concurrency)
        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(one(client, gate, body) for _ in range(args.requests))),
                                         args.timeout)
        return results, time.perf_counter() - start, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None, help="Model id (default: the first /v1/models lists).")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="The history of the city begins with")
    ap.add_argument("--timeout", type=float, default=900.0, help="Seconds for the whole batch.")
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--server", default=None,
                    help="What the record calls the server (e.g. llama-server); default: the engine in the model id.")
    args = ap.parse_args()
    check_loopback(args.url)

    started = time.time()
    results, wall, model = asyncio.run(run(args))
    ok = [r for r in results if r["ok"]]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(r["tokens"] for r in results)
    metrics = {
        "requests": len(results), "requests_ok": len(ok), "errors": [r["error"] for r in results if not r["ok"]][:5],
        "ttft_p50_s": float(np.percentile(ttfts, 50)) if ttfts else None,
        "ttft_p95_s": float(np.percentile(ttfts, 95)) if ttfts else None,
        "latency_p50_s": float(np.percentile(lat, 50)) if lat else None,
        "latency_p95_s": float(np.percentile(lat, 95)) if lat else None,
        "generated_tokens": tokens, "wall_s": wall, "total_tps": tokens / wall if wall else None,
        "mean_request_tps": statistics.mean(r["tokens"] / r["latency_s"] for r in ok) if ok else None,
    }
    engine = args.server or (model.rpartition("@")[2] if "@" in model else "server")
    config = {k: getattr(args, k) for k in ("url", "requests", "concurrency", "max_tokens", "prompt")}
    source = None if args.server else served_source(model)  # another server's model id is not billion's spec
    record = make_record("serve_load", engine, model, config, metrics, started=started, source=source,
                         status="complete" if len(ok) == len(results) else "interrupted")
    print(f"{len(ok)}/{len(results)} requests complete with {args.max_tokens} tokens each; "
          f"TTFT p50 {metrics['ttft_p50_s']:.3f} s, p95 {metrics['ttft_p95_s']:.3f} s; "
          f"{metrics['total_tps']:.1f} tok/s in total over {wall:.2f} s" if ttfts else f"failures: {metrics['errors']}")
    print(f"record: {write_record(record, args.results_dir)}")
    if len(ok) != len(results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
