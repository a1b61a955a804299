"""Are the tokens the same as before a change to the decode path? Each generation path, from two commits.

Runs this file's `generate` in a process from --before's tree (a git worktree under
~/.cache/billion/worktrees, as scripts/decode_loop_ab.py makes it) and from this tree, on the same
model and engines, and compares the token ids of each case: greedy and seeded sampling through
Backend.stream (each sampling setting the old loops treated differently), speculative decoding
with a draft model and with prompt lookup, a grammar, and generate_all's batch. Prints one line
per case and engine: same, or the first position where they part.

    .venv/bin/python scripts/same_tokens_as_before.py -m gguf:smollm2-135m -b torch,mlx

Before the one scheduler, a plain temperature / top-p request (no top-k, min-p, penalty or
grammar) was sampled by each engine's own loop with the engine's own generator (torch.multinomial,
mlx.random): those seeded tokens are expected to change (the one rule draws them with numpy now,
the same on every engine); every other case is expected to be the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "greedy": dict(max_tokens=24),
    "seeded temperature+top-p (the engines' own samplers before)": dict(max_tokens=24, temperature=0.8, top_p=0.9, seed=3),
    "seeded top-k+penalty (the shared session loop before)": dict(max_tokens=24, temperature=0.8, top_k=20,
                                                                  repetition_penalty=1.2, seed=5),
}


def generate(model: str, engines: str) -> dict:
    """{case@engine: token ids} from the tree this process imports billion from."""
    import backends
    from backends import constraints
    from backends.batching import generate_all
    from backends.speculation import NgramDraft
    from backends.types import GenerationConfig
    from billion.loading import LoadOptions, load, resolve

    resolved = resolve(model)
    out = {}
    for engine in backends.engine_names(engines):
        b = load(engine, resolved, LoadOptions())
        prompt = b.tokenize("The quick brown fox jumps over the lazy dog. The quick brown fox")
        for name, kw in CASES.items():
            out[f"{name}@{engine}"] = b.generate(prompt, GenerationConfig(**kw))
        greedy = GenerationConfig(max_tokens=24)
        out[f"prompt lookup, greedy@{engine}"] = b.generate(prompt, greedy, draft=NgramDraft(), num_draft=3)
        out[f"prompt lookup, seeded top-k@{engine}"] = b.generate(
            prompt, GenerationConfig(max_tokens=24, temperature=0.8, top_k=20, seed=7), draft=NgramDraft(), num_draft=3)
        out[f"draft model (itself), greedy@{engine}"] = b.generate(prompt, greedy, draft=b, num_draft=3)
        regex = GenerationConfig(max_tokens=24, temperature=0.9, seed=2, grammar=constraints.regex(r"(yes|no), [0-9]{3}"))
        out[f"grammar, seeded@{engine}"] = b.generate(prompt, regex)
        prompts = [prompt, prompt[:8], prompt[3:], prompt[:5]]
        if b.can_batch:
            got = generate_all(b, prompts, [greedy] * 4, max_batch=4)
            out[f"generate_all batch of 4, greedy@{engine}"] = [g.tokens for g in got]
        b.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("-b", "--backends", default="torch,mlx")
    ap.add_argument("--before", default="39631e0")
    ap.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.emit:
        print(json.dumps(generate(args.model, args.backends)))
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    from decode_loop_ab import worktree

    runs = {}
    for side, tree in (("before", worktree(args.before)), ("after", ROOT)):
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run([sys.executable, __file__, "--emit", "-m", args.model, "-b", args.backends],
                              cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
        runs[side] = json.loads(done.stdout.strip().splitlines()[-1])
    for case, before in runs["before"].items():
        after = runs["after"].get(case)
        if after == before:
            print(f"same     {case}")
        else:
            flat_b, flat_a = json.dumps(before), json.dumps(after)
            at = next((i for i, (x, y) in enumerate(zip(flat_b, flat_a)) if x != y), None)
            print(f"DIFFERS  {case}: before {flat_b[:80]}... after {flat_a[:80]}... (text position {at})")


if __name__ == "__main__":
    main()
