"""What /metrics costs a request: the counting billion serve does for every answer (its status, its
time to first token, one inter-token latency per token, its token counts), timed alone, beside the
time of a real request on the same machine.

    .venv/bin/python scripts/metrics_overhead.py -m gguf:smollm2-135m --tokens 64 --requests 20

Prints the median of each and their ratio, and writes a `metrics_overhead` record.
"""

from __future__ import annotations

import argparse
import statistics
import time

from fastapi.testclient import TestClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="gguf:smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--results-dir", default="results")
    args = parser.parse_args()

    import backends
    from billion.loading import resolve
    from billion.records.store import make_record, write_record
    from billion.server.app import create_app
    from billion.server.metrics import ServerMetrics

    resolved = resolve(args.model, progress=False)
    backend = backends.get("torch").load(resolved.folder, device="cpu", dtype="float32")
    app = create_app({"m": backend})
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": args.tokens, "ignore_eos": True,
            "temperature": 0}
    request_s = []
    with TestClient(app, base_url="http://localhost") as client:
        client.post("/v1/completions", json=body)  # warm-up
        for _ in range(args.requests):
            start = time.perf_counter()
            assert client.post("/v1/completions", json=body).status_code == 200
            request_s.append(time.perf_counter() - start)

    metrics = ServerMetrics({})
    counting_s = []
    for _ in range(args.requests * 50):
        start = time.perf_counter()
        metrics.ttft.labels("m").observe(0.1)
        for _ in range(args.tokens - 1):
            metrics.itl.labels("m").observe(0.01)
        metrics.ended("m", 16, args.tokens, 0)
        metrics.answered("/v1/completions", 200)
        counting_s.append(time.perf_counter() - start)
    req, count = statistics.median(request_s), statistics.median(counting_s)
    print(f"a {args.tokens}-token request: {req * 1000:.1f} ms (median of {args.requests}); its counting for "
          f"/metrics: {count * 1e6:.1f} us (median); ratio {count / req:.5f}")
    record = make_record("metrics_overhead", "torch", args.model, vars(args),
                         {"request_s": req, "counting_s": count, "ratio": count / req}, started=time.time(),
                         source=resolved.source)
    print("wrote", write_record(record, args.results_dir))


if __name__ == "__main__":
    main()
