"""lm-evaluation-harness on billion's engines: one `lm_eval.api.model.LM` over a loaded Backend.

lm-eval builds the prompts, few-shot examples, chat templates, filters and metrics of a task;
billion's engine answers its three kinds of request, with the semantics of lm-eval's own
Hugging Face model (`lm_eval/models/huggingface.py`), so that the same task gives the same
answers on `hf`, `billion-torch` and `billion-mlx`:

- loglikelihood: Backend.score (encode_pair is lm-eval's `_encode_pair`; an empty context is
  BOS, else EOS), padded batches of --batch-size, over-long rows cut on the left;
- loglikelihood_rolling: the text's tokens in lm-eval's disjoint rolling windows of the model's
  context (`get_rolling_token_windows(..., context_len=1)` + `make_disjoint_window`), each
  scored as a (context, continuation) pair, summed per text;
- generate_until: the prompt cut on the left to leave room for `max_gen_toks`, generated
  greedily unless `do_sample`, stopped at EOS or as soon as a stop string (`until`, plus
  the EOS text) appears, and cut at the first stop string.

lm_eval is imported only inside functions (`pip install billion[eval]`): `billion --help`
works without it. The LM class lives in billion.tasks.lm_eval_model, which imports lm_eval at
its top and is imported by `lm_class()`; it registers itself as `billion-mlx`, `billion-torch`
and `billion-llama.cpp`, so `lm_eval.simple_evaluate(model="billion-torch",
model_args="pretrained=<spec>")` works too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from backends.types import UserError

INSTALL = 'billion eval needs lm-evaluation-harness: pip install "billion[eval]" (or pip install "lm-eval>=0.4")'


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...]
    include_path: str | None = None
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | None = None  # samples per task (the first N)
    apply_chat_template: bool = False
    batch_size: int = 4
    bootstrap_iters: int = 1000  # stderr of non-mean metrics (lm-eval's CLI: 100000)


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None
    return lm_eval


# ---------------------------------------------------------------- the LM


def lm_class():
    """billion's `lm_eval.api.model.LM` (billion.tasks.lm_eval_model.BillionLM), registered with
    lm_eval's model registry as billion-mlx, billion-torch and billion-llama.cpp."""
    require_lm_eval()
    # Imported here, not at the top: that module imports lm_eval, which is optional, and
    # importing it registers the model names (once: Python caches the module).
    from billion.tasks.lm_eval_model import BillionLM

    return BillionLM


def rolling_windows(tokens: list[int], prefix: int, max_len: int, context_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows, made disjoint: (context ids, ids to score) pairs, every token
    scored exactly once; the first window's context is the prefix token, each later window's
    the up-to max_len - n tokens before its n scored ones (at least context_len - 1)."""
    if not 1 <= context_len <= max_len:
        raise UserError(f"the window context must be 1 to {max_len} tokens, not {context_len}")
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    pred_len = max_len - context_len + 1
    first = min(max_len, len(tokens))
    out.append(([prefix] + tokens[: first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        out.append((tokens[max(end - max_len - 1, 0): end - 1], tokens[end - n: end]))
        done = end
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in out]


# ---------------------------------------------------------------- running tasks


def task_manager(include_path: str | None, tasks: tuple[str, ...]):
    """A TaskManager that indexes only --include-path when it holds every task asked for
    (lm-eval's own thousands of YAML files take seconds to index), else both."""
    from lm_eval.tasks import TaskManager

    if include_path:
        if not Path(include_path).is_dir():
            raise UserError(f"--include-path {include_path} is not a folder")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r} (lm-eval knows {len(manager.all_tasks)} tasks and groups; "
                        f"`lm-eval ls tasks` lists them, --include-path adds a folder of task YAMLs)")
    return manager


def evaluate(lm, cfg: EvalConfig, manager=None) -> dict:
    """lm_eval.simple_evaluate on an LM (a BillionLM, or lm-eval's own for comparisons);
    returns lm-eval's results dict, samples included."""
    require_lm_eval()
    import lm_eval

    import lm_eval.evaluator

    manager = manager or task_manager(cfg.include_path, cfg.tasks)
    # lm-eval's environment report runs torch's collect_env (subprocesses, seconds a call);
    # billion's records carry their own environment, so it is skipped for the run.
    saved = lm_eval.evaluator.add_env_info
    lm_eval.evaluator.add_env_info = lambda storage: None
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            apply_chat_template=cfg.apply_chat_template, task_manager=manager, log_samples=True,
            bootstrap_iters=cfg.bootstrap_iters, batch_size=cfg.batch_size)
    finally:
        lm_eval.evaluator.add_env_info = saved


def task_metrics(results: dict, task: str) -> dict:
    """One task's metrics with lm-eval's "metric,filter" keys flattened: `acc`, `acc_stderr`
    (filter "none"), `exact_match/strict-match` (other filters)."""
    out = {}
    for key, value in results["results"][task].items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}/{filt}"
        out[name] = None if isinstance(value, float) and math.isnan(value) else value
    out["samples"] = results.get("n-samples", {}).get(task, {}).get("effective")
    out["num_fewshot"] = results.get("n-shot", {}).get(task)
    return out


def _plain(x):
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return x
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    return str(x)


def task_samples(results: dict, task: str, metric_names: list[str]) -> list[dict]:
    """Per-sample answers: doc id, target, lm-eval's filtered responses, the prediction (multiple
    choice: the index of the most likely choice; generation: the text) and the sample's metrics."""
    out = []
    for s in sorted(results.get("samples", {}).get(task, []), key=lambda s: s["doc_id"]):
        resps = _plain(s["filtered_resps"])
        row = {"doc_id": s["doc_id"], "target": _plain(s["target"]), "filter": s.get("filter")}
        if resps and all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], float) for r in resps):
            lls = [r[0] for r in resps]  # multiple choice: (log-likelihood, is_greedy) per choice
            row["loglikelihoods"] = lls
            row["pred"] = max(range(len(lls)), key=lambda k: lls[k])
        elif resps and all(isinstance(r, float) for r in resps):
            row["loglikelihoods"] = resps  # rolling log-likelihood / one continuation
            row["pred"] = resps[0] if len(resps) == 1 else resps
        else:
            row["pred"] = resps[0] if len(resps) == 1 else resps
        row.update({m: _plain(s[m]) for m in metric_names if m in s})
        out.append(row)
    return out


def summarise(results: dict) -> dict[str, dict]:
    """task -> {"metrics": ..., "samples": [...]}, for every task lm-eval scored."""
    out = {}
    for task in results["results"]:
        if task not in results.get("samples", {}):
            continue  # a group's aggregate, not a task with samples
        metrics = task_metrics(results, task)
        names = sorted({k.split("/")[0] for k in metrics if not k.endswith("_stderr")} - {"samples", "num_fewshot"})
        out[task] = {"metrics": metrics, "samples": task_samples(results, task, names)}
    return out


def agreement(a: list[dict], b: list[dict]) -> dict:
    """Share of samples on which two engines gave the same answer, and their largest
    log-likelihood difference (over every choice / text scored)."""
    by_id = {s["doc_id"]: s for s in b}
    common = [(s, by_id[s["doc_id"]]) for s in a if s["doc_id"] in by_id]
    out = {"samples_compared": len(common), "same_answer_share": None, "max_abs_loglik_diff": None}
    if not common:
        return out
    out["same_answer_share"] = sum(_same(x["pred"], y["pred"]) for x, y in common) / len(common)
    diffs = [abs(p - q) for x, y in common if x.get("loglikelihoods") and y.get("loglikelihoods")
             for p, q in zip(x["loglikelihoods"], y["loglikelihoods"])]
    out["max_abs_loglik_diff"] = max(diffs) if diffs else None
    return out


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float):  # a rolling log-likelihood: the same to 1e-3
        return abs(x - y) <= 1e-3 * max(1.0, abs(x))
    return x == y



def lm_eval_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_engine(backend, cfg: EvalConfig, manager=None, checkpoint=None) -> dict:
    """Every task of cfg on one loaded engine: task -> {"metrics", "samples"}; with a checkpoint,
    requests an interrupted run answered are not computed again."""
    lm = lm_class()(backend=backend, batch_size=cfg.batch_size, checkpoint=checkpoint)
    return summarise(evaluate(lm, cfg, manager))
