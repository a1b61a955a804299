"""What the one scheduler costs a single stream: Backend.stream (a batch of one) against the loop
each engine had of its own before it, in one process, alternately.

The reference loops are the deleted `_token_stream`s, greedy, as they were: torch feeds a
transformers DynamicCache and takes torch's argmax; MLX runs mlx-lm's `generate_step` (device-side
sampling, the next step `mx.async_eval`'d before the host reads the token); each token then goes
through the text side (a TextStream), as the old Backend.stream sent them. Both sides generate the
same tokens from the same prompt (checked); decode tok/s is timed from the first token to the last,
medians of --reps, the order alternating each rep. The goal (issue 29): ratio >= 0.97.

    .venv/bin/python scripts/one_loop_cost.py -m gguf:smollm2-135m -b torch,mlx -n 64 --reps 6

Writes one `one_loop_cost` record per engine under --results-dir.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import backends
from backends.types import GenerationConfig
from billion.loading import LoadOptions, load, resolve
from billion.records.store import make_record, write_record


def own_tokens(backend, prompt: list[int], n: int):
    """The engine's own greedy loop as it was before the scheduler: a callable -> token ids."""
    if backend.name == "mlx":
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        def run():
            for token, _ in generate_step(mx.array(prompt), backend.model, max_tokens=n):
                yield int(token)
        return run

    import torch
    from transformers import DynamicCache

    @torch.inference_mode()
    def run():
        cache = DynamicCache(config=backend.model.config)
        logits = backend.model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True,
                               logits_to_keep=1).logits[:, -1, :]
        for i in range(n):
            token = logits.argmax(dim=-1)
            yield int(token.item())
            if i + 1 < n:
                logits = backend.model(input_ids=token.view(1, 1), cache=cache, use_cache=True).logits[:, -1, :]
    return run


def reference_loop(backend, prompt: list[int], gen):
    """The old Backend.stream on the engine's own loop: its tokens through a TextStream, timed as
    its chunks were (a callable -> (token ids, chunk times))."""
    from backends.text_stream import TextStream

    tokens_of = own_tokens(backend, prompt, gen.max_tokens)

    def run():
        text, tokens, times = TextStream(backend.tokenizer, backend.eos_ids, gen), [], []
        for token in tokens_of():
            for chunk in text.push(token, time.perf_counter()):
                tokens.append(chunk.token)
                times.append(chunk.time_s)
        return tokens, times
    return run


def decode_tps(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("-b", "--backend", default="torch,mlx")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=16)
    ap.add_argument("-n", "--gen-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    model = resolve(args.model)
    for engine in backends.engine_names(args.backend):
        started = time.time()
        backend = load(engine, model, LoadOptions())
        prompt = np.random.default_rng(0).integers(0, backend.vocab_size, args.prompt_tokens).tolist()
        gen = GenerationConfig(max_tokens=args.gen_tokens, ignore_eos=True)

        def scheduler():
            chunks = list(backend.stream(prompt, gen))
            return [c.token for c in chunks], [c.time_s for c in chunks]

        reference = reference_loop(backend, prompt, gen)
        assert scheduler()[0] == reference()[0], "the scheduler and the engine's own loop disagree"  # and a warm-up
        rates = {"scheduler": [], "own_loop": []}
        for rep in range(args.reps):
            order = [("scheduler", scheduler), ("own_loop", reference)]
            for name, fn in order if rep % 2 == 0 else order[::-1]:
                rates[name].append(decode_tps(fn()[1]))
        med = {k: statistics.median(v) for k, v in rates.items()}
        ratio = med["scheduler"] / med["own_loop"]
        print(f"{engine}: scheduler {med['scheduler']:.2f} tok/s vs the engine's own loop {med['own_loop']:.2f} "
              f"-> {ratio:.3f} (median of {args.reps}; {args.prompt_tokens}+{args.gen_tokens} tokens)")
        metrics = {"scheduler_decode_tps": med["scheduler"], "own_loop_decode_tps": med["own_loop"],
                   "ratio": ratio, "all": rates}
        record = make_record("one_loop_cost", engine, str(model), vars(args), metrics, started=started,
                             source=model.source)
        print("  record:", write_record(record, args.results_dir))
        backend.close()


if __name__ == "__main__":
    main()
