"""The cost of `echo` with `logprobs` on a running `billion serve`, as lm-eval's local-completions
sends it: a prompt of --prompt-tokens token ids and one generated token, then the same prompt with
its last token changed (the next answer of the same question), --requests times; medians of the
request times, plain and echoed. The server listens on 127.0.0.1 only.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/echo_cost.py -m gguf:smollm2-135m --engine torch
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import start_server  # noqa: E402  scripts/soak.py, beside this file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--requests", type=int, default=5)
    args = ap.parse_args()
    import requests

    ids = [1000 + (i * 7919) % 20000 for i in range(args.prompt_tokens)]
    proc, url, _ = start_server(SimpleNamespace(model=args.model, backend=args.engine, parallel=1,
                                                serve_arg=["--dtype", "float32"]))
    try:
        for kind in ("plain", "echo"):
            times = []
            for i in range(args.requests + 1):  # the first one: nothing to reuse yet, not counted
                body = {"model": args.model, "prompt": [ids[:-1] + [ids[-1] + i + (kind == "echo") * 100]],
                        "max_tokens": 1, "temperature": 0}
                if kind == "echo":
                    body.update(echo=True, logprobs=1)
                t = time.perf_counter()
                answer = requests.post(url + "/v1/completions", json=body, timeout=600)
                answer.raise_for_status()
                times.append(time.perf_counter() - t)
            print(f"{kind}: first {times[0]:.3f} s, then median {statistics.median(times[1:]):.3f} s "
                  f"({args.prompt_tokens}-token prompt, last token changed, {args.engine})")
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
