"""Toolkit overhead: the same generation through billion and through the library directly.

For each engine, one loaded model generates the same greedy tokens from the same
random prompt, alternately through `Backend.stream` (billion) and through the
library's own generation call — `mlx_lm.stream_generate` for MLX, transformers'
`model.generate` for torch — and the median wall times are compared as a ratio
(billion / library; the goal is <= 1.03). Both sides include prefill.

    .venv/bin/python scripts/overhead.py --model random:tinyllama --backend all \
        --prompt-tokens 16 --gen-tokens 16 --reps 5

Writes one `overhead` record per engine under --results-dir.
"""

from __future__ import annotations

import argparse
import statistics
import time

from backends.types import GenerationConfig
from billion.tasks.bench import random_prompt
from billion.loading import LoadOptions, load, resolve
from billion.records.store import make_record, write_record
import backends


def library_generate(backend, prompt: list[int], n: int):
    """A callable running the library's own generation of n greedy tokens."""
    if backend.name == "mlx":
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        wrapper = TokenizerWrapper(backend.tokenizer)

        def run():
            out = [r.token for r in stream_generate(backend.model, wrapper, mx.array(prompt), max_tokens=n)]
            return out
    else:
        import torch

        ids = torch.tensor([prompt], device=backend.device)

        def run():
            # min_new_tokens: ignore EOS, like billion's benchmark mode
            out = backend.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                         pad_token_id=backend.tokenizer.pad_token_id)
            return out[0, len(prompt):].tolist()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:tinyllama")
    ap.add_argument("--backend", default="all")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()

    model = resolve(args.model)
    for engine in backends.engine_names(args.backend):
        started = time.time()
        backend = load(engine, model, LoadOptions(dtype=args.dtype))
        prompt = random_prompt(backend.vocab_size, args.prompt_tokens, 0)
        gen = GenerationConfig(max_tokens=args.gen_tokens, ignore_eos=True)
        lib = library_generate(backend, prompt, args.gen_tokens)

        def ours():
            return [c.token for c in backend.stream(prompt, gen)]

        assert ours() == lib(), "billion and the library generated different tokens"  # also a warm-up
        times = {"billion": [], "library": []}
        for rep in range(args.reps):
            order = [("billion", ours), ("library", lib)]
            for name, fn in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["billion"] / med["library"]
        library_name = "mlx_lm.stream_generate" if engine == "mlx" else "transformers generate"
        print(f"{engine}: billion {med['billion']:.3f} s vs {library_name} {med['library']:.3f} s "
              f"-> ratio {ratio:.3f} (median of {args.reps}; {args.prompt_tokens}+{args.gen_tokens} tokens)")
        metrics = {"billion_s": med["billion"], "library_s": med["library"], "ratio": ratio,
                   "billion_all_s": times["billion"], "library_all_s": times["library"], "library": library_name}
        rec = make_record("overhead", engine, str(model), vars(args), metrics, started=started, source=model.source)
        print("  record:", write_record(rec, args.results_dir))
        backend.close()


if __name__ == "__main__":
    main()
