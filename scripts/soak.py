"""Soak test of `billion serve`: a mixed load for a given time, every answer checked, memory watched.

Starts `billion serve` itself (127.0.0.1, a free port; -b all by default) and runs --clients
client threads until --minutes have passed. Each client draws request kinds from a fixed mix:

  chat            chat completion, greedy, not streamed: its token count and finish reason
  stream          completion, sampled with a seed, streamed with a usage chunk: exactly max_tokens
  logprobs        completion with logprobs (legacy shape): one entry per token
  chat_logprobs   chat streamed with logprobs and top_logprobs: one entry per token
  schema          chat with a JSON schema (scripts/schemas.json): a reply ending in "stop" must
                  parse and validate
  tool            chat with tools and tool_choice "required" (--chat-template chatml-tools): a
                  reply ending in "tool_calls" must name a tool and carry arguments that validate
  conversation    two turns, the second continuing the first: a prompt-cache hit where the cache
                  still holds it (cached_tokens counted, never required: other clients evict)
  unique          a prompt never seen before: a prompt-cache miss
  cancelled       streamed, the connection closed after three events
  abandoned       not streamed, the connection closed after 0.3 s
  malformed       a client mistake (bad JSON, a wrong type, an unknown model, content null): a 4xx

Every request's kind, model, status, latency and verdict are recorded; a sampler reads the
server's RSS (psutil) and /health (requests in flight, what each engine holds) every
--sample-s seconds. At the end, once idle, the server must hold no request.

The run fails (exit 1) on any 5xx, any request answered wrongly, any exception in a client, the
floor of RSS growing by more than --max-rss-growth-mb (the lowest RSS of the last window against
the lowest of the first after --warmup-minutes: a leak raises the floor, while the prompt caches
and a long prompt's activations move the peaks and return), or per-engine state not bounded (more
rows than --parallel decoding or in the prompt cache, more requests queued than clients). It reports p50/p99 latency of the first and last --window-minutes after warm-up.

    .venv/bin/python scripts/soak.py --minutes 30                     # the issue's soak
    .venv/bin/python scripts/soak.py -m tiny:tinyllama --minutes 1    # a smoke run

Writes a `soak` record under --results-dir and a chart (RSS and latency over time) beside it.
Only 127.0.0.1 is ever contacted; every loop is bounded by --minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx
import jsonschema
import psutil

from billion.records.store import make_record, write_record

SCHEMAS = json.loads((Path(__file__).parent / "schemas.json").read_text())
TOPICS = ["the sea", "a volcano", "bread", "a violin", "winter", "bees", "a library", "the moon", "rust", "tea"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}]
MIX = (["chat"] * 3 + ["stream"] * 3 + ["logprobs", "chat_logprobs", "schema", "schema", "tool", "conversation",
       "unique", "cancelled", "abandoned", "malformed"])


class Wrong(Exception):
    """The server answered, but not what the request asked for."""


class Refused(Exception):
    """A valid request answered with an error status (429, busy, is not one: it is retried later)."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def answered(r: httpx.Response) -> bool:
    """True for a 200 (then check it), False for a 429; Refused for any other status."""
    if r.status_code not in (200, 429):
        raise Refused(r.status_code, r.text)
    return r.status_code == 200


# ---------------------------------------------------------------- the server


def start_server(args) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-m", "billion", "serve", "-m", args.model, "-b", args.backend, "--port", "0",
           "--parallel", str(args.parallel), "--chat-template", "chatml-tools", *args.serve_arg]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    log: list[str] = []
    deadline = time.time() + 600
    while True:
        line = proc.stdout.readline()
        if not line or time.time() > deadline:
            proc.kill()
            raise SystemExit("billion serve did not start:\n" + "".join(log[-20:]))
        log.append(line)
        if m := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
            break
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()  # the pipe never fills
    return proc, m.group(1), log


# ---------------------------------------------------------------- request kinds


def tokens_of(r: httpx.Response) -> int:
    return r.json()["usage"]["completion_tokens"]


def expect(condition: bool, why: str) -> None:
    if not condition:
        raise Wrong(why)


def check_length(choice: dict, tokens: int, max_tokens: int) -> None:
    reason = choice["finish_reason"]
    expect(tokens <= max_tokens, f"{tokens} tokens for max_tokens {max_tokens}")
    expect(reason != "length" or tokens == max_tokens, f"finish_reason length after {tokens}/{max_tokens} tokens")


def sse(client: httpx.Client, path: str, body: dict, stop_after: int | None = None):
    """(status, events): the stream's JSON events, or the error body's. stop_after: hang up then."""
    events = []
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            answered(r)
            return r.status_code, []
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                if "error" in events[-1]:  # a failure after the status line: a 5xx in all but name
                    raise Refused(500, json.dumps(events[-1]))
            elif line == "data: [DONE]":
                events.append("[DONE]")
            if stop_after is not None and len(events) >= stop_after:
                return 0, events  # closing the stream closes the connection
    return r.status_code, events


def run_kind(kind: str, client: httpx.Client, url: str, model: str, rng: random.Random, state: dict) -> int:
    """Send one request of this kind, check its answer (Wrong if not right); its HTTP status (0 when
    the client hung up on purpose)."""
    topic = rng.choice(TOPICS)
    user = [{"role": "user", "content": f"Tell me one fact about {topic}."}]
    if kind == "chat":
        r = client.post("/v1/chat/completions", json={"model": model, "messages": user, "max_tokens": 16,
                                                      "temperature": 0})
        if answered(r):
            check_length(r.json()["choices"][0], tokens_of(r), 16)
        return r.status_code
    if kind == "stream":
        n = rng.randint(8, 32)
        status, events = sse(client, "/v1/completions", {
            "model": model, "prompt": f"A story about {topic}:", "max_tokens": n, "ignore_eos": True,
            "temperature": 0.8, "seed": rng.randint(0, 2**31), "stream": True,
            "stream_options": {"include_usage": True}})
        if status == 200:
            expect(events[-1] == "[DONE]", "no [DONE]")
            expect(events[-2]["usage"]["completion_tokens"] == n, f"usage {events[-2]['usage']} for {n} tokens")
            expect(events[-3]["choices"][0]["finish_reason"] == "length", "not cut at max_tokens")
        return status
    if kind == "logprobs":
        r = client.post("/v1/completions", json={"model": model, "prompt": f"Facts about {topic}:", "max_tokens": 8,
                                                 "ignore_eos": True, "temperature": 0, "logprobs": 2})
        if answered(r):
            lp = r.json()["choices"][0]["logprobs"]
            expect(len(lp["token_logprobs"]) == tokens_of(r) == 8, f"{len(lp['token_logprobs'])} logprobs, 8 tokens")
            expect(all(v <= 0 for v in lp["token_logprobs"]), "a log-probability above 0")
        return r.status_code
    if kind == "chat_logprobs":
        status, events = sse(client, "/v1/chat/completions", {
            "model": model, "messages": user, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 3, "stream": True, "stream_options": {"include_usage": True}})
        if status == 200:
            entries = [e for ev in events[:-1] if ev.get("choices") for e in
                       ((ev["choices"][0].get("logprobs") or {}).get("content") or [])]
            expect(len(entries) == events[-2]["usage"]["completion_tokens"], "logprobs and tokens disagree")
            expect(all(len(e["top_logprobs"]) == 3 for e in entries), "top_logprobs not 3 each")
        return status
    if kind == "schema":
        case = rng.choice(SCHEMAS)
        r = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": case["prompt"]}], "max_tokens": 96,
            "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
                "name": case["name"], "schema": case["schema"], "strict": True}}})
        if answered(r):
            choice = r.json()["choices"][0]
            check_length(choice, tokens_of(r), 96)
            if choice["finish_reason"] == "stop":
                try:
                    jsonschema.validate(json.loads(choice["message"]["content"]), case["schema"])
                except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                    raise Wrong(f"schema {case['name']}: {str(e)[:200]}") from None
        return r.status_code
    if kind == "tool":
        r = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": f"What is the weather near {topic}?"}],
            "tools": TOOLS, "tool_choice": "required", "max_tokens": 40, "temperature": 0})
        if answered(r):
            choice = r.json()["choices"][0]
            check_length(choice, tokens_of(r), 40)
            if choice["finish_reason"] == "tool_calls":
                calls = choice["message"].get("tool_calls") or []
                expect(calls and all(c["function"]["name"] == "get_weather" for c in calls), f"calls {calls}")
                for c in calls:
                    try:
                        jsonschema.validate(json.loads(c["function"]["arguments"]), TOOLS[0]["function"]["parameters"])
                    except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                        raise Wrong(f"tool arguments: {str(e)[:200]}") from None
            else:
                expect(choice["finish_reason"] == "length", f"tool_choice required ended {choice['finish_reason']}")
        return r.status_code
    if kind == "conversation":
        body = {"model": model, "messages": user, "max_tokens": 12, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
        if not answered(r):
            return r.status_code
        body["messages"] = user + [r.json()["choices"][0]["message"], {"role": "user", "content": "Another one?"}]
        r = client.post("/v1/chat/completions", json=body)
        if answered(r):
            state["cache_hits"] += r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
            state["cache_turns"] += 1
        return r.status_code
    if kind == "unique":
        prompt = f"[{rng.getrandbits(64):x}] Say something about {topic}."
        r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
        if answered(r):
            expect(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] < r.json()["usage"]["prompt_tokens"],
                   "a never-seen prompt was all cached")
        return r.status_code
    if kind == "cancelled":
        status, _ = sse(client, "/v1/completions", {"model": model, "prompt": f"About {topic}:", "max_tokens": 200,
                                                    "ignore_eos": True, "stream": True}, stop_after=3)
        return status
    if kind == "abandoned":
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            body = json.dumps({"model": model, "prompt": f"About {topic}:", "max_tokens": 200, "ignore_eos": True})
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            time.sleep(0.3)
            s.shutdown(socket.SHUT_RDWR)
        return 0
    if kind == "malformed":
        bad = rng.choice([b"{not json", json.dumps({"model": model, "prompt": 5}).encode(),
                          json.dumps({"model": "no-such-model", "prompt": "hi"}).encode(),
                          json.dumps({"model": model, "messages": [{"role": "user", "content": None}]}).encode(),
                          json.dumps({"model": model, "prompt": "hi", "temperature": -1}).encode()])
        path = "/v1/chat/completions" if b"messages" in bad else "/v1/completions"
        r = client.post(path, content=bad, headers={"Content-Type": "application/json"})
        expect(400 <= r.status_code < 500, f"a malformed request got {r.status_code}")
        return r.status_code
    raise ValueError(kind)


# ---------------------------------------------------------------- the run


def client_loop(i: int, args, url: str, models: list[str], until: float, started: float, results: list,
                state: dict) -> None:
    rng = random.Random(args.seed * 1000 + i)
    kinds = [k for k in MIX if k not in args.skip]
    with httpx.Client(base_url=url, timeout=300) as client:
        n = 0
        while time.time() < until:
            if n % len(kinds) == 0:
                rng.shuffle(kinds)
            kind, model = kinds[n % len(kinds)], models[(n + i) % len(models)]
            n += 1
            t0 = time.time()
            row = {"t": round(t0 - started, 3), "client": i, "kind": kind, "model": model}
            try:
                row["status"] = run_kind(kind, client, url, model, rng, state)
                row["ok"] = True  # a valid request answered (or refused as busy), a malformed one with a 4xx
            except Wrong as e:
                row.update(status=200, ok=False, why=str(e))
            except Refused as e:
                row.update(status=e.status, ok=False, why=str(e))
            except Exception as e:  # noqa: BLE001 - a client error is a finding too: recorded, and the run fails
                row.update(status=-1, ok=False, why=f"{type(e).__name__}: {e}")
            row["latency_s"] = round(time.time() - t0, 4)
            results.append(row)


def sampler(proc: subprocess.Popen, url: str, stop: threading.Event, started: float, samples: list,
            every: float) -> None:
    ps = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            health = httpx.get(url + "/health", timeout=30).json()
        except (httpx.HTTPError, ValueError):
            health = {}
        samples.append({"t": round(time.time() - started, 2), "rss_mb": round(ps.memory_info().rss / 2**20, 1),
                        "requests": health.get("requests"), "engines": health.get("engines")})
        stop.wait(every)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


TIMED = {"chat", "stream", "logprobs", "chat_logprobs", "schema", "tool", "conversation", "unique"}


def window_latency(results: list, start: float, end: float) -> dict:
    got = [r["latency_s"] for r in results if start <= r["t"] < end and r["kind"] in TIMED and r["ok"]]
    return {"requests": len(got), "p50_s": percentile(got, 50), "p99_s": percentile(got, 99)}


def summarize(args, results: list, samples: list, idle: dict, duration: float) -> tuple[dict, list[str]]:
    failures = []
    by = Counter((r["kind"], r["status"]) for r in results)
    five = [r for r in results if r["status"] >= 500]
    wrong = [r for r in results if not r["ok"] and 0 <= r["status"] < 500]
    errors = [r for r in results if r["status"] == -1]
    if five:
        failures.append(f"{len(five)} answers were 5xx, e.g. {five[0]}")
    if wrong:
        failures.append(f"{len(wrong)} answers were wrong, e.g. {wrong[0]}")
    if errors:
        failures.append(f"{len(errors)} client errors, e.g. {errors[0]}")
    warm, window = args.warmup_minutes * 60, args.window_minutes * 60
    # A leak raises the floor of RSS; the prompt caches (rows of any length, up to --parallel per
    # engine) and a long prompt's activations move its peaks and return. So the bound is on the
    # floor: the lowest RSS of the last window against the lowest of the first after warm-up.
    first_rss = [s["rss_mb"] for s in samples if warm <= s["t"] < warm + window]
    last_rss = [s["rss_mb"] for s in samples if s["t"] >= duration - window]
    growth = round(min(last_rss) - min(first_rss), 1) if first_rss and last_rss else None
    if growth is None or growth > args.max_rss_growth_mb:
        failures.append(f"RSS floor grew {growth} MB after warm-up (bound {args.max_rss_growth_mb} MB)")
    after = [s for s in samples if s["t"] >= warm]
    held = [e["held"] for s in samples if s["engines"] for e in s["engines"].values()]
    most = {k: max((h[k] for h in held), default=0) for k in ("running", "queued", "prompt_cache",
                                                              "prompt_cache_tokens")}
    for what, bound in (("running", args.parallel), ("prompt_cache", args.parallel), ("queued", args.clients)):
        if most[what] > bound:
            failures.append(f"an engine held {most[what]} {what} (bound {bound})")
    if any(idle["requests"].values()) or any(e["held"]["running"] or e["held"]["queued"]
                                             for e in idle["engines"].values()):
        failures.append(f"requests still held once idle: {idle}")
    first, last = window_latency(results, warm, warm + window), window_latency(results, duration - window, duration)
    ratio = (last["p99_s"] / first["p99_s"]) if first["p99_s"] and last["p99_s"] else None
    metrics = {
        "requests": len(results), "status_5xx": len(five), "wrong": len(wrong), "client_errors": len(errors),
        "by_kind_status": {f"{k} {s}": n for (k, s), n in sorted(by.items())},
        "rss_mb_start": samples[0]["rss_mb"] if samples else None,
        "rss_mb_floor_first_window": min(first_rss, default=None), "rss_mb_floor_last_window": min(last_rss, default=None),
        "rss_mb_peak_after_warmup": max((s["rss_mb"] for s in after), default=None),
        "rss_mb_end": samples[-1]["rss_mb"] if samples else None,
        "rss_floor_growth_mb": growth, "held_max": most,
        "latency_first_window": first, "latency_last_window": last, "p99_ratio_last_to_first": ratio,
    }
    return metrics, failures


def chart(path: Path, results: list, samples: list, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    minutes = [s["t"] / 60 for s in samples]
    top.plot(minutes, [s["rss_mb"] for s in samples], label="server RSS")
    top.axvline(args.warmup_minutes, color="grey", linestyle=":", label="end of warm-up")
    top.set_ylabel("MiB")
    top.legend(loc="lower left")
    cached = top.twinx()
    cached.plot(minutes, [sum(e["held"]["prompt_cache_tokens"] for e in (s["engines"] or {}).values())
                          for s in samples], color="tab:green", alpha=0.5, linewidth=0.8)
    cached.set_ylabel("tokens in the prompt caches", color="tab:green")
    step = 60.0
    ends = [step * (i + 1) for i in range(int(max((r["t"] for r in results), default=0) // step) + 1)]
    for q, style in ((50, "-"), (99, "--")):
        xs, ys = [], []
        for end in ends:
            v = window_latency(results, end - step, end)[f"p{q}_s"]
            if v is not None:
                xs.append((end - step / 2) / 60)
                ys.append(v)
        bottom.plot(xs, ys, style, label=f"p{q} latency, per minute")
    bottom.set_ylabel("seconds")
    bottom.set_xlabel("minutes")
    bottom.legend()
    fig.suptitle(f"billion serve soak: {args.model} -b {args.backend}, {args.clients} clients", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", default="gguf:smollm2-135m")
    p.add_argument("--backend", "-b", default="all")
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--parallel", type=int, default=4, help="billion serve --parallel")
    p.add_argument("--warmup-minutes", type=float, default=5)
    p.add_argument("--window-minutes", type=float, default=5, help="latency windows compared: first and last")
    p.add_argument("--max-rss-growth-mb", type=float, default=50)
    p.add_argument("--sample-s", type=float, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-arg", action="append", default=[], help="one more billion serve argument (repeatable)")
    p.add_argument("--skip", action="append", default=[], choices=sorted(set(MIX)), metavar="KIND",
                   help="leave a request kind out of the mix (repeatable), e.g. tool for a model whose context "
                        "cannot hold the tools prompt")
    p.add_argument("--results-dir", default="results")
    args = p.parse_args()

    started = time.time()
    proc, url, log = start_server(args)
    begun = time.time()  # the timelines' zero: the server is up
    results: list = []
    samples: list = []
    state = {"cache_hits": 0, "cache_turns": 0}
    try:
        models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"] if "@" in m["id"]]
        print(f"soaking {url} ({', '.join(models)}) for {args.minutes} min with {args.clients} clients", flush=True)
        stop = threading.Event()
        watch = threading.Thread(target=sampler, args=(proc, url, stop, begun, samples, args.sample_s))
        watch.start()
        until = time.time() + args.minutes * 60
        clients = [threading.Thread(target=client_loop, args=(i, args, url, models, until, begun, results, state))
                   for i in range(args.clients)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        duration = time.time() - begun
        time.sleep(1)  # the abandoned requests' last steps
        idle = httpx.get(url + "/health", timeout=30).json()
        stop.set()
        watch.join()
    finally:
        proc.terminate()
        proc.wait(60)
    server_log = "".join(log)
    metrics, failures = summarize(args, results, samples, idle, duration)
    metrics["prompt_cache_hit_turns"] = f"{state['cache_hits']}/{state['cache_turns']}"
    if "Traceback" in server_log:
        failures.append("a traceback in the server's log")
    metrics["failures"] = failures
    print(f"{'kind':<14} {'status':>6} {'count':>6}")
    for key, n in metrics["by_kind_status"].items():
        kind, status = key.split()
        print(f"{kind:<14} {status:>6} {n:>6}")
    for key in ("requests", "status_5xx", "wrong", "client_errors", "rss_mb_start", "rss_mb_floor_first_window",
                "rss_mb_floor_last_window", "rss_mb_peak_after_warmup", "rss_mb_end", "rss_floor_growth_mb",
                "held_max", "latency_first_window",
                "latency_last_window", "p99_ratio_last_to_first", "prompt_cache_hit_turns"):
        print(f"{key}: {metrics[key]}")
    config = {k: getattr(args, k) for k in ("minutes", "clients", "parallel", "warmup_minutes", "window_minutes",
                                            "max_rss_growth_mb", "seed", "skip")}
    record = make_record("soak", args.backend, args.model, config, metrics, started=started,
                         extra={"samples": samples})
    path = write_record(record, args.results_dir)
    rows = path.with_suffix(".requests.jsonl")  # every request, too many to keep in the record
    rows.write_text("".join(json.dumps(r) + "\n" for r in results))
    chart(path.with_suffix(".png"), results, samples, args)
    print(f"record: {path}\nrequests: {rows}\nchart: {path.with_suffix('.png')}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        raise SystemExit(1)
    print("passed: no 5xx, no wrong answer, memory and per-request state bounded")


if __name__ == "__main__":
    main()
