"""Prompt cache: time to first token of a conversation's 5th turn against its 1st, with and without
reusing the conversation's KV session (backends.sessions.PromptCache, what `billion chat` and
`billion serve` do).

Each turn sends a message of the same length (--message-words random common words, seeded) and
gets a reply of exactly --reply-tokens tokens (EOS ignored), so turn k's prompt is about k times
turn 1's. Without the cache every turn recomputes the whole transcript (TTFT grows with the
conversation); with it, a turn computes only its new message and the previous reply's end (TTFT
stays near turn 1's). Each condition runs --reps conversations, alternating; medians are reported.

    .venv/bin/python scripts/prompt_cache_bench.py -m gguf:smollm2-135m -b all --message-words 64
    .venv/bin/python scripts/prompt_cache_bench.py -m tiny:tinyllama -b all --message-words 12 --reply-tokens 8

(the tiny models' context is 512 tokens: all turns must fit, or the script stops.)

Writes one `prompt_cache` record per engine under --results-dir (metrics: ttft_turn1_s and
ttft_turn5_s with and without the cache, their ratio, the cached prompt tokens of each turn).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import backends
from backends.types import GenerationConfig
from billion.tasks.chat import Chat
from billion.loading import LoadOptions, load, resolve
from billion.records.store import make_record, write_record

WORDS = ("the of and to in is was for on that with as by at from it his an were are which this be or has had "
         "not but one first new after also their its two have they who been other all time more into most "
         "city year world people state part during only school many over later used some then such when "
         "war history family well known three water river north south light day music field house").split()


def messages(turns: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(turns)]


def conversation(backend, texts: list[str], reply_tokens: int, cache: bool) -> list[dict]:
    chat = Chat(backend, GenerationConfig(max_tokens=reply_tokens, ignore_eos=True), prompt_cache=cache)
    turns = []
    for text in texts:
        reply = chat.ask(text)
        for _ in reply.pieces():
            pass
        s = reply.stats
        if s.dropped_turns:
            raise SystemExit(f"turn {len(turns) + 1} no longer fits the context of {backend.context_length} tokens "
                             f"(the oldest exchange was dropped): lower --message-words or --reply-tokens")
        turns.append({"prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens, "ttft_s": s.ttft_s,
                      "tokens": s.tokens})
    return turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("-b", "--backend", default="all")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--message-words", type=int, default=64)
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()

    model = resolve(args.model)
    texts = messages(args.turns, args.message_words)
    for engine in backends.engine_names(args.backend):
        started = time.time()
        backend = load(engine, model, LoadOptions(device=args.device, dtype=args.dtype))
        try:
            if not backend.has_chat_template:
                print(f"{engine}: no chat template: the plain transcript is used")
            conversation(backend, texts[:2], 2, True)  # warm-up
            runs = {False: [], True: []}
            for rep in range(args.reps):
                for cache in (False, True):
                    runs[cache].append(conversation(backend, texts, args.reply_tokens, cache))
            metrics = {}
            for cache, name in ((False, "no_cache"), (True, "cache")):
                per_turn = [statistics.median(run[i]["ttft_s"] for run in runs[cache]) for i in range(args.turns)]
                metrics[f"ttft_by_turn_{name}_s"] = per_turn
                metrics[f"ttft_turn1_{name}_s"] = per_turn[0]
                metrics[f"ttft_turn{args.turns}_{name}_s"] = per_turn[-1]
                metrics[f"ttft_last_over_first_{name}"] = per_turn[-1] / per_turn[0]
                metrics[f"cached_tokens_by_turn_{name}"] = [t["cached_tokens"] for t in runs[cache][0]]
            metrics["prompt_tokens_by_turn"] = [t["prompt_tokens"] for t in runs[True][0]]
            metrics[f"ttft_turn{args.turns}_speedup"] = (metrics[f"ttft_turn{args.turns}_no_cache_s"]
                                                         / metrics[f"ttft_turn{args.turns}_cache_s"])
            config = {k: getattr(args, k) for k in ("turns", "message_words", "reply_tokens", "reps", "device", "dtype")}
            record = make_record("prompt_cache", engine, str(model), config, metrics, started=started,
                                 source=model.source,
                                 extra={"model_info": backend.info().__dict__})
            last = args.turns
            print(f"{engine}: prompt tokens by turn {metrics['prompt_tokens_by_turn']}; TTFT turn 1 / turn {last}: "
                  f"without cache {metrics['ttft_turn1_no_cache_s']:.3f} / {metrics[f'ttft_turn{last}_no_cache_s']:.3f} s, "
                  f"with cache {metrics['ttft_turn1_cache_s']:.3f} / {metrics[f'ttft_turn{last}_cache_s']:.3f} s "
                  f"(turn {last}: {metrics[f'ttft_turn{last}_speedup']:.2f}x faster with the cache)")
            print(f"record: {write_record(record, args.results_dir)}")
        finally:
            backend.close()


if __name__ == "__main__":
    main()
