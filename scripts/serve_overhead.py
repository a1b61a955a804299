"""Overhead of `billion serve` against `billion chat` in-process, side by side in one run.

Loads the model here (the direct path: billion.tasks.chat.Chat, what `billion chat` runs) and starts
`billion serve` on the same model and engine in a subprocess on a free loopback port. Then, for
--reps rounds, asks each of --questions once directly and once through the server with the
official `openai` client (streamed chat completion), alternating, one request at a time: the two
never compute at once. Every reply is greedy and exactly --max-tokens tokens long (EOS ignored),
and both paths must give the same text. Both paths start each question as a new conversation
and keep their prompt cache, so each reuses the shared system prefix alike.

Timed from the caller's side: time to first text (TTFT) and the whole request; requests/s is one
over the median request time (sequential requests from one client). Ratios are server / direct.

    .venv/bin/python scripts/serve_overhead.py -m gguf:smollm2-135m -b torch
    .venv/bin/python scripts/serve_overhead.py -m tiny:tinyllama -b torch --reps 1 --max-tokens 4   # smoke

Writes one `serve_overhead` record per engine under --results-dir.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx
from openai import OpenAI

import backends
from backends.types import GenerationConfig
from billion.tasks.chat import Chat
from billion.loading import LoadOptions, load, resolve
from billion.records.store import make_record, write_record

QUESTIONS = ["What is the capital of France?", "Name a large river in Africa.", "What do bees make?",
             "How many legs does a spider have?", "What colour is the sky on a clear day?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, engine: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "billion", "serve", "-m", args.model, "-b", engine, "--port", str(port),
           "--log-level", "warning"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    server = subprocess.Popen(cmd)
    deadline = time.time() + args.load_timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"billion serve exited with {server.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"billion serve was not ready after {args.load_timeout:.0f} s")


def direct(chat: Chat, question: str) -> tuple[float, float, str]:
    chat.turns = []  # a new conversation; the prompt cache stays, as the server's does
    sent = time.perf_counter()
    reply = chat.ask(question)
    first = None
    for piece in reply.pieces():
        if piece and first is None:
            first = time.perf_counter()
    done = time.perf_counter()
    return (first or done) - sent, done - sent, reply.text  # no text at all: TTFT is the whole request


def served(client: OpenAI, model: str, question: str, max_tokens: int) -> tuple[float, float, str]:
    sent = time.perf_counter()
    first, text = None, []
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    for event in stream:
        for choice in event.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                text.append(choice.delta.content)
    done = time.perf_counter()
    return (first or done) - sent, done - sent, "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("-b", "--backend", default="torch")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--load-timeout", type=float, default=600.0)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()

    model = resolve(args.model)
    gen = GenerationConfig(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    for engine in backends.engine_names(args.backend):
        started = time.time()
        port = free_port()
        server = start_server(args, engine, port)
        backend = load(engine, model, LoadOptions(dtype=args.dtype))
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
            served_id = client.models.list().data[0].id
            info = backend.info().__dict__
            chat = Chat(backend, gen)
            direct(chat, "Hello.")  # warm-up, both paths
            served(client, served_id, "Hello.", args.max_tokens)
            times = {"direct": [], "server": []}
            mismatches = []
            for _ in range(args.reps):
                for q in QUESTIONS:
                    d = direct(chat, q)
                    s = served(client, served_id, q, args.max_tokens)
                    times["direct"].append(d[:2])
                    times["server"].append(s[:2])
                    if d[2].strip() != s[2].strip():  # billion chat strips the reply's leading space
                        mismatches.append({"question": q, "direct": d[2], "server": s[2]})
        finally:
            server.terminate()
            server.wait(30)
            backend.close()
        metrics = {}
        for path, runs in times.items():
            metrics[f"{path}_ttft_s"] = statistics.median(t for t, _ in runs)
            metrics[f"{path}_request_s"] = statistics.median(r for _, r in runs)
            metrics[f"{path}_requests_per_s"] = 1 / metrics[f"{path}_request_s"]
        metrics["ttft_ratio"] = metrics["server_ttft_s"] / metrics["direct_ttft_s"]
        metrics["request_ratio"] = metrics["server_request_s"] / metrics["direct_request_s"]
        metrics["requests"] = len(times["server"])
        metrics["text_mismatches"] = mismatches
        config = {"reps": args.reps, "max_tokens": args.max_tokens, "dtype": args.dtype, "questions": QUESTIONS,
                  "client": "openai streamed chat.completions", "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        record = make_record("serve_overhead", engine, str(model), config, metrics, started=started,
                             source=model.source,
                             extra={"model_info": info})
        print(f"{engine}: {metrics['requests']} requests each way, {args.max_tokens} tokens; median TTFT direct "
              f"{metrics['direct_ttft_s']:.3f} s, server {metrics['server_ttft_s']:.3f} s "
              f"({metrics['ttft_ratio']:.2f}x); request {metrics['direct_request_s']:.3f} s vs "
              f"{metrics['server_request_s']:.3f} s ({metrics['request_ratio']:.2f}x; "
              f"{metrics['direct_requests_per_s']:.2f} vs {metrics['server_requests_per_s']:.2f} req/s); "
              f"{len(mismatches)} replies differ")
        print(f"record: {write_record(record, args.results_dir)}")


if __name__ == "__main__":
    main()
