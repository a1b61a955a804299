"""What the host-side sampling rule costs a row a step, before and after a change to backends/sampling.py.

Loads backends/sampling.py as it was at --before (git show) beside the current one, takes the
next-token logits of 8 positions of a real prompt (torch, float32), checks that both give the same
distribution and the same seeded token for each setting, and times each: the before side as the
scheduler called it (sample(distribution(...))), the after side as it calls it now (choose).

    .venv/bin/python scripts/sampling_cost.py -m gguf:smollm2-135m

Writes one `sampling_cost` record under --results-dir.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np

from backends import sampling
from backends.types import GenerationConfig
from billion.loading import LoadOptions, load, resolve
from billion.records.store import make_record, write_record

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [GenerationConfig(), GenerationConfig(temperature=0.7), GenerationConfig(temperature=0.7, top_p=0.9),
            GenerationConfig(temperature=1.0, top_p=0.95), GenerationConfig(temperature=0.7, top_k=40),
            GenerationConfig(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05)]


def old_rule(rev: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:backends/sampling.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "sampling_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sampling_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("--before", default="39631e0")
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    started = time.time()
    before = old_rule(args.before)
    model = resolve(args.model)
    backend = load("torch", model, LoadOptions())
    rows = backend.session().feed(backend.tokenize("The capital of France is Paris. The weather today is"))[-8:]
    out = []
    for gen in SETTINGS:
        for row in rows:
            assert np.array_equal(before.distribution(row, gen), sampling.distribution(row, gen)), gen
            for seed in range(3):
                assert before.sample(before.distribution(row, gen), np.random.default_rng(seed)) == \
                    sampling.choose(row, gen, [], [], None, np.random.default_rng(seed)), gen
        rng = np.random.default_rng(0)
        was = timeit.timeit(lambda: [before.sample(before.distribution(r, gen), rng) for r in rows], number=10)
        now = timeit.timeit(lambda: [sampling.choose(r, gen, [], [], None, rng) for r in rows], number=10)
        was, now = was / 10 / len(rows), now / 10 / len(rows)
        name = (f"temperature {gen.temperature}" + (f", top-p {gen.top_p}" if gen.top_p < 1 else "")
                + (f", top-k {gen.top_k}" if gen.top_k else "") + (f", min-p {gen.min_p}" if gen.min_p else ""))
        print(f"{name}: before {was * 1e6:.0f} us, after {now * 1e6:.0f} us a row (same tokens)")
        out.append({"setting": name, "before_us": was * 1e6, "after_us": now * 1e6})
    record = make_record("sampling_cost", "numpy", str(model), vars(args), {"rows": out}, started=started,
                         source=model.source)
    print("record:", write_record(record, args.results_dir))


if __name__ == "__main__":
    sys.exit(main())
