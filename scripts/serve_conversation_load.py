"""The prompt cache under load: a 5-turn conversation's TTFT on a running `billion serve` while
other clients decode.

--background clients stream long completions (--background-tokens each, EOS ignored, one after
another) for as long as the conversation lasts; meanwhile one client holds a --turns-turn chat
conversation: each turn sends a message of --message-words seeded common words and streams a
reply of exactly --reply-tokens tokens (EOS ignored), so turn k's prompt is about k times turn 1's.
Without a prompt cache turn 5 would prefill the whole transcript; with the server's (the batch's
finished rows) it prefills its new message only. Reports each turn's TTFT (request sent -> first
text), its prompt and cached tokens, and turn 5's TTFT over turn 1's. Bounded: the background
clients stop when the conversation ends, and --timeout bounds everything. Loopback URLs only.

    .venv/bin/billion serve -m gguf:smollm2-135m -b torch &
    .venv/bin/python scripts/serve_conversation_load.py --url http://127.0.0.1:8080 --background 7

Writes one `serve_conversation` record under --results-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_cache_bench import messages  # noqa: E402 - the same seeded messages

from backends.types import UserError  # noqa: E402
from billion.records.store import make_record, write_record  # noqa: E402
from billion.tasks.serve_bench import check_loopback, served_source  # noqa: E402


async def stream(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """One streamed request: TTFT, text, usage."""
    sent, first, text, usage = time.perf_counter(), None, [], None
    async with client.stream("POST", path, json={**body, "stream": True,
                                                  "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
            usage = event.get("usage") or usage
    return {"ttft_s": (first or time.perf_counter()) - sent, "text": "".join(text), "usage": usage or {}}


async def background(client, model: str, tokens: int, stop: asyncio.Event, done: list) -> None:
    body = {"model": model, "prompt": "The history of the city begins with", "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True}
    while not stop.is_set():
        got = await stream(client, "/v1/completions", body)
        done.append(got["usage"].get("completion_tokens", 0))


async def conversation(client, model: str, args) -> list[dict]:
    history, turns = [], []
    for text in messages(args.turns, args.message_words, args.seed):
        history.append({"role": "user", "content": text})
        got = await stream(client, "/v1/chat/completions", {
            "model": model, "messages": history, "max_tokens": args.reply_tokens, "temperature": 0,
            "ignore_eos": True})
        history.append({"role": "assistant", "content": got["text"]})
        usage = got["usage"]
        turns.append({"ttft_s": got["ttft_s"], "prompt_tokens": usage.get("prompt_tokens"),
                      "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")})
    return turns


async def run(args):
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        stop, done = asyncio.Event(), []
        others = [asyncio.create_task(background(client, model, args.background_tokens, stop, done))
                  for _ in range(args.background)]
        await asyncio.sleep(args.warmup_s)  # the background batch is decoding before turn 1
        try:
            turns = await asyncio.wait_for(conversation(client, model, args), args.timeout)
        finally:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*others), args.timeout)
        return model, turns, sum(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None, help="Model id (default: the first /v1/models lists).")
    ap.add_argument("--background", type=int, default=7, help="Clients decoding meanwhile.")
    ap.add_argument("--background-tokens", type=int, default=64)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--message-words", type=int, default=64)
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    try:
        check_loopback(args.url)
    except UserError as e:
        raise SystemExit(str(e)) from None
    started = time.time()
    model, turns, background_tokens = asyncio.run(run(args))
    ratio = turns[-1]["ttft_s"] / turns[0]["ttft_s"]
    for i, t in enumerate(turns, 1):
        print(f"turn {i}: TTFT {t['ttft_s']:.3f} s, prompt {t['prompt_tokens']} tokens, {t['cached_tokens']} cached")
    print(f"turn {len(turns)} TTFT / turn 1 TTFT = {ratio:.2f}x, with {args.background} clients decoding "
          f"({background_tokens} background tokens)")
    metrics = {"turns": turns, "ttft_last_over_first": ratio, "background_clients": args.background,
               "background_tokens": background_tokens}
    record = make_record("serve_conversation", model.rpartition("@")[2] or "?", model.rpartition("@")[0] or model,
                         vars(args), metrics, started=started, source=served_source(model))
    print(f"record: {write_record(record, args.results_dir)}")


if __name__ == "__main__":
    main()
