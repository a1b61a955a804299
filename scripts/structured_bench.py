"""Structured output: how often a small model's JSON is valid with and without a grammar, and what
the grammar's mask costs per decoded token.

Measures, per engine (--engines torch,mlx), on the JSON schemas of scripts/schemas.json (each with
a short instruction; the schema itself goes in the system message, "Answer with JSON only,
following this schema: ...", under the model's chat template):

1. Valid-output rate. Greedy generation of every prompt, unconstrained and constrained
   (GenerationConfig.grammar = backends.constraints.json_schema(schema)), --max-tokens each,
   through backends.batching.generate_all (8 decoded together). An output is valid when json.loads
   parses it and jsonschema's Draft202012Validator (with a FormatChecker, plus an RFC 3339
   date-time check of its own when jsonschema has none installed) finds no error. Unconstrained
   outputs are counted twice: strict (the whole text) and lenient (``` fences stripped, else the
   text from the first { or [ to the last } or ]). Reported: counts, rates, the finish reasons of
   the invalid outputs, why each invalid one failed, and whether the engines' constrained texts
   are the same.
2. Mask cost per token. The first --timing-prompts prompts are generated constrained with the
   batch generator (backends.batching.BatchGenerator, max_batch 1 and 8), timing every step;
   Matcher.allowed (llguidance's bitmask, unpacked), Matcher.advance and sampling.distribution
   are timed from inside the same run (wrapped). Then the same prompts are generated unconstrained
   with ignore_eos and each prompt's max_tokens set to the number of tokens its constrained run
   made, so both runs decode the same number of rows at every step. Per token (median over pure
   decode steps, those that admitted no request, of step time / tokens that step): the decode
   time constrained and unconstrained, their ratio, and the mask's time: allowed + advance + the
   masked sampling's extra time over the plain one (the np.where of distribution), also as a
   share of the constrained decode time per token. The constrained and unconstrained runs
   alternate, --reps times each, and their steps are pooled. The mask's share is measured inside
   the constrained run itself; the constrained/unconstrained ratio compares two runs, so it also
   carries the machine's noise between them.
3. Which JSON-schema features llguidance refuses: each of a list of tiny schemas offered to
   constraints.json_schema, refused or not and with what message (no model needed).

Reproduce (2-core CPU, SmolLM2-135M-Instruct from its Q4_1 GGUF, float32):

    OMP_NUM_THREADS=2 .venv/bin/python scripts/structured_bench.py --engines torch,mlx --json structured.json

Quick checks: `--check-schemas` (every schema compiles in llguidance and is a valid JSON-schema
document, and the refused-feature list; no model), `--limit 2 --max-tokens 40` (a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema

import backends
from backends import constraints, sampling
from backends.batching import generate_all
from backends.types import GenerationConfig

SCHEMAS = Path(__file__).with_name("schemas.json")
SYSTEM = "Answer with JSON only, following this schema: {schema}"

# JSON-schema features offered to llguidance one at a time (section 3): a tiny schema each
FEATURES = {
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "if/then/else": {"type": "object", "properties": {"a": {"type": "integer"}},
                     "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["a"]}, "else": {}},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "string"}}},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
    "minProperties / maxProperties": {"type": "object", "minProperties": 1, "maxProperties": 2},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    "minContains": {"type": "array", "contains": {"type": "integer"}, "minContains": 2},
    "dependentRequired": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                          "dependentRequired": {"a": ["b"]}},
    "dependentSchemas": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}},
    "not": {"not": {"type": "string"}},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                        {"properties": {"b": {"type": "integer"}}}]},
    "unevaluatedProperties": {"type": "object", "properties": {"a": {"type": "string"}},
                              "unevaluatedProperties": False},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    "recursive $ref": {"$defs": {"n": {"type": "object", "properties": {
        "c": {"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 2}}}}, "$ref": "#/$defs/n"},
    "$ref to a remote URL": {"$ref": "https://example.com/schema.json"},
    "multipleOf (integer)": {"type": "integer", "multipleOf": 5},
    "multipleOf (number)": {"type": "number", "multipleOf": 0.5},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0},
    "format email": {"type": "string", "format": "email"},
    "format uri": {"type": "string", "format": "uri"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format uuid": {"type": "string", "format": "uuid"},
    "format hostname": {"type": "string", "format": "hostname"},
    "format ipv4": {"type": "string", "format": "ipv4"},
    "format regex": {"type": "string", "format": "regex"},
    "pattern with look-ahead": {"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]+$"},
    "pattern with a backreference": {"type": "string", "pattern": "^(a)\\1$"},
}

# ------------------------------------------------------------------ validity


RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def format_checker() -> jsonschema.FormatChecker:
    """jsonschema's format checks; "date-time" by RFC 3339 ourselves when jsonschema has none
    installed (it needs rfc3339-validator, and without it passes every string)."""
    checker = jsonschema.FormatChecker()
    if "date-time" not in checker.checkers:
        @checker.checks("date-time", raises=ValueError)
        def _date_time(value) -> bool:
            if not isinstance(value, str):
                return True
            if not RFC3339.match(value):
                return False
            datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))  # ValueError: bad date
            return True
    return checker


CHECKER = format_checker()
FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def candidates(text: str, lenient: bool) -> list[str]:
    """The texts json.loads is tried on: the whole text; leniently also a fenced block's content and
    the span from the first { or [ to the last } or ]."""
    out = [text]
    if lenient:
        fence = FENCE.search(text)
        if fence:
            out.append(fence.group(1))
        starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
        end = max(text.rfind("}"), text.rfind("]"))
        if starts and end > min(starts):
            out.append(text[min(starts):end + 1])
    return out


def check(text: str, schema: dict, lenient: bool = False) -> str | None:
    """None if `text` is valid JSON under `schema`, else why not (one short line)."""
    problem = "not JSON"
    for candidate in candidates(text, lenient):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema, format_checker=CHECKER).iter_errors(value))
        if error is None:
            return None
        where = "/".join(map(str, error.absolute_path)) or "(top)"
        problem = f"schema: {where}: {error.message[:80]}"
    return problem


@dataclass
class Validity:
    results: dict = field(default_factory=dict)  # mode -> [{"name", "text", "tokens", "finish", "problem"}]
    seconds: dict = field(default_factory=dict)  # mode -> wall time of its generate_all


def prompt_ids(backend, item: dict) -> list[int]:
    system = SYSTEM.format(schema=json.dumps(item["schema"]))
    return backend.apply_chat_template([{"role": "system", "content": system},
                                        {"role": "user", "content": item["prompt"]}])


def validity(backend, items: list[dict], grammars: list[str], max_tokens: int, max_batch: int) -> Validity:
    prompts = [prompt_ids(backend, item) for item in items]
    out = Validity()
    for mode, gens in (("unconstrained", [GenerationConfig(max_tokens=max_tokens)] * len(items)),
                       ("constrained", [GenerationConfig(max_tokens=max_tokens, grammar=g) for g in grammars])):
        start = time.perf_counter()
        got = generate_all(backend, prompts, gens, max_batch=max_batch)
        out.seconds[mode] = time.perf_counter() - start
        rows = []
        for item, g in zip(items, got):
            row = {"name": item["name"], "text": g.text, "tokens": len(g.tokens), "finish": g.finish_reason,
                   "problem": check(g.text, item["schema"])}
            if mode == "unconstrained":
                row["problem_lenient"] = check(g.text, item["schema"], lenient=True)
            rows.append(row)
        out.results[mode] = rows
    return out


# ------------------------------------------------------------------ mask cost


class Probe:
    """Time spent in Matcher.allowed, Matcher.advance and sampling.distribution, per batch step
    (wrapping them while installed; the batch generator calls them through the class and module)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.allowed_s = self.advance_s = self.sample_s = 0.0

    @contextlib.contextmanager
    def installed(self):
        allowed, advance, distribution = constraints.Matcher.allowed, constraints.Matcher.advance, sampling.distribution
        clock = time.perf_counter

        def timed_allowed(matcher):
            t = clock()
            try:
                return allowed(matcher)
            finally:
                self.allowed_s += clock() - t

        def timed_advance(matcher, token):
            t = clock()
            try:
                return advance(matcher, token)
            finally:
                self.advance_s += clock() - t

        def timed_distribution(*args, **kwargs):
            t = clock()
            try:
                return distribution(*args, **kwargs)
            finally:
                self.sample_s += clock() - t

        constraints.Matcher.allowed, constraints.Matcher.advance = timed_allowed, timed_advance
        sampling.distribution = timed_distribution
        try:
            yield self
        finally:
            constraints.Matcher.allowed, constraints.Matcher.advance = allowed, advance
            sampling.distribution = distribution


def timed_run(backend, prompts: list[list[int]], gens: list[GenerationConfig],
              max_batch: int) -> tuple[list[int], list[dict]]:
    """Each prompt's token count (its EOS included: a step was spent on it) and every step's timing."""
    batch = backend.batch(max_batch=max_batch, prompt_cache_size=0)
    uids = [batch.add(p, g) for p, g in zip(prompts, gens)]  # matchers built here, outside the steps
    counts = dict.fromkeys(uids, 0)
    steps = []
    probe = Probe()
    with probe.installed():
        while batch.busy:
            waiting = len(batch.waiting)
            probe.reset()
            start = time.perf_counter()
            events = batch.step()
            seconds = time.perf_counter() - start
            tokens = 0
            for e in events:
                if e.finish_reason == "error":
                    raise sampling.SamplingError(e.error)
                if e.token is not None:
                    counts[e.uid] += 1
                    tokens += 1
            steps.append({"seconds": seconds, "tokens": tokens, "admitted": waiting - len(batch.waiting),
                          "allowed_s": probe.allowed_s, "advance_s": probe.advance_s, "sample_s": probe.sample_s})
    return [counts[u] for u in uids], steps


def per_token(steps: list[dict], key: str) -> float:
    """Median over pure decode steps (no request admitted) of steps[key] / tokens made, in ms."""
    values = [s[key] / s["tokens"] for s in steps if not s["admitted"] and s["tokens"]]
    return 1000 * statistics.median(values) if values else float("nan")


def mask_cost(backend, items: list[dict], grammars: list[str], max_tokens: int, max_batch: int, reps: int) -> dict:
    """Constrained and equal-length unconstrained runs, alternating, `reps` of each; their steps pooled."""
    prompts = [prompt_ids(backend, item) for item in items]
    constrained, plain = [], []
    for _ in range(reps):
        counts, steps = timed_run(backend, prompts, [GenerationConfig(max_tokens=max_tokens, grammar=g)
                                                     for g in grammars], max_batch)
        constrained += steps
        plain += timed_run(backend, prompts, [GenerationConfig(max_tokens=n, ignore_eos=True) for n in counts],
                           max_batch)[1]
    for s in constrained:
        s["mask_s"] = s["allowed_s"] + s["advance_s"]
    decode_c, decode_u = per_token(constrained, "seconds"), per_token(plain, "seconds")
    sample_c, sample_u = per_token(constrained, "sample_s"), per_token(plain, "sample_s")
    llguidance_ms = per_token(constrained, "mask_s")
    mask_ms = llguidance_ms + max(0.0, sample_c - sample_u)
    return {"batch": max_batch, "prompts": len(items), "reps": reps, "tokens": sum(counts),
            "decode_steps": sum(1 for s in constrained if not s["admitted"] and s["tokens"]),
            "decode_ms_per_token_constrained": decode_c, "decode_ms_per_token_unconstrained": decode_u,
            "ratio_constrained_unconstrained": decode_c / decode_u,
            "allowed_ms_per_token": per_token(constrained, "allowed_s"),
            "advance_ms_per_token": per_token(constrained, "advance_s"),
            "sampling_ms_per_token_constrained": sample_c, "sampling_ms_per_token_unconstrained": sample_u,
            "mask_ms_per_token": mask_ms, "mask_share_of_decode": mask_ms / decode_c}


# ------------------------------------------------------------------ schemas and features


def check_schemas(items: list[dict]) -> list[str]:
    """Problems: schemas that are not valid JSON-schema documents or that llguidance refuses."""
    problems = []
    for item in items:
        try:
            jsonschema.Draft202012Validator.check_schema(item["schema"])
        except jsonschema.SchemaError as e:
            problems.append(f"{item['name']}: not a valid JSON schema: {e.message}")
        try:
            constraints.json_schema(item["schema"])
        except constraints.ConstraintError as e:
            problems.append(f"{item['name']}: {e}")
    return problems


def feature_support() -> list[dict]:
    rows = []
    for feature, schema in FEATURES.items():
        try:
            constraints.json_schema(schema)
            rows.append({"feature": feature, "refused": False, "message": ""})
        except constraints.ConstraintError as e:
            rows.append({"feature": feature, "refused": True,
                         "message": str(e).removeprefix("the JSON schema cannot be enforced: ")})
    return rows


# ------------------------------------------------------------------ report


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version()}


def rate(n: int, total: int) -> str:
    return f"{n}/{total} ({100 * n / total:.0f}%)" if total else "-"


def summarize(v: Validity) -> dict:
    u, c = v.results["unconstrained"], v.results["constrained"]
    n = len(u)
    summary = {"schemas": n,
               "unconstrained_strict_valid": sum(r["problem"] is None for r in u),
               "unconstrained_lenient_valid": sum(r["problem_lenient"] is None for r in u),
               "constrained_valid": sum(r["problem"] is None for r in c),
               "seconds": v.seconds}
    for mode, rows, key in (("unconstrained_lenient", u, "problem_lenient"), ("constrained", c, "problem")):
        reasons = {}
        for r in rows:
            if r[key] is not None:
                reasons[r["finish"]] = reasons.get(r["finish"], 0) + 1
        summary[f"{mode}_invalid_finish_reasons"] = reasons
    return summary


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets the whole table
    m = report["machine"]
    console.print(f"[bold]Machine[/]: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, "
                  f"torch threads {m['torch_threads']} (OMP_NUM_THREADS={m['OMP_NUM_THREADS']}); "
                  f"weights: {report['weights']}; float32 on the CPU; greedy; max_tokens {report['max_tokens']}")

    table = Table(title="Valid JSON under the schema (json.loads + jsonschema Draft 2020-12)")
    for col in ("engine", "schemas", "unconstrained strict", "unconstrained lenient", "constrained",
                "invalid (lenient) by finish", "invalid (constrained) by finish", "gen s (unc / con)"):
        table.add_column(col)
    for engine, e in report["engines"].items():
        s = e["validity"]
        table.add_row(engine, str(s["schemas"]), rate(s["unconstrained_strict_valid"], s["schemas"]),
                      rate(s["unconstrained_lenient_valid"], s["schemas"]), rate(s["constrained_valid"], s["schemas"]),
                      json.dumps(s["unconstrained_lenient_invalid_finish_reasons"]),
                      json.dumps(s["constrained_invalid_finish_reasons"]),
                      f"{s['seconds']['unconstrained']:.1f} / {s['seconds']['constrained']:.1f}")
    console.print(table)

    for engine, e in report["engines"].items():
        detail = Table(title=f"{engine}: per schema (tokens, finish reason, problem)")
        for col in ("schema", "unconstrained (lenient)", "unconstrained text", "constrained", "constrained text"):
            detail.add_column(col, overflow="fold")
        for u, c in zip(e["outputs"]["unconstrained"], e["outputs"]["constrained"]):
            detail.add_row(u["name"], escape(f"{u['tokens']} {u['finish']}: {u['problem_lenient'] or 'valid'}"),
                           escape(u["text"][:60]),
                           escape(f"{c['tokens']} {c['finish']}: {c['problem'] or 'valid'}"),
                           escape(c["text"][:100]))
        console.print(detail)

    if report.get("same_constrained_texts") is not None:
        same = report["same_constrained_texts"]
        console.print(f"[bold]Constrained texts the same on {', '.join(report['engines'])}[/]: "
                      f"{same['same']}/{same['schemas']}"
                      + (f"; differ: {', '.join(same['differ'])}" if same["differ"] else ""))

    table = Table(title="Mask cost per decoded token (ms, medians over pure decode steps; mask = allowed + advance "
                        "+ sampling's extra time with the mask)")
    for col in ("engine", "max batch", "prompts", "tokens x reps", "decode constrained", "decode unconstrained",
                "ratio",
                "allowed", "advance", "sampling con / unc", "mask", "mask % of decode"):
        table.add_column(col)
    for engine, e in report["engines"].items():
        for t in e["mask_cost"]:
            table.add_row(engine, str(t["batch"]), str(t["prompts"]), f"{t['tokens']} x {t['reps']}",
                          f"{t['decode_ms_per_token_constrained']:.2f}",
                          f"{t['decode_ms_per_token_unconstrained']:.2f}",
                          f"{t['ratio_constrained_unconstrained']:.3f}",
                          f"{t['allowed_ms_per_token']:.3f}", f"{t['advance_ms_per_token']:.3f}",
                          f"{t['sampling_ms_per_token_constrained']:.3f} / "
                          f"{t['sampling_ms_per_token_unconstrained']:.3f}",
                          f"{t['mask_ms_per_token']:.3f}", f"{100 * t['mask_share_of_decode']:.1f}%")
    console.print(table)
    print_features(report["features"], console)


def print_features(features: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="JSON-schema features: does llguidance (constraints.json_schema) refuse them?")
    table.add_column("feature")
    table.add_column("refused")
    table.add_column("message", overflow="fold")
    for f in features:
        table.add_row(f["feature"], "refused" if f["refused"] else "accepted", escape(f["message"]))
    (console or Console(width=None if sys.stdout.isatty() else 160)).print(table)


# ------------------------------------------------------------------ main


def real_folder() -> Path:
    """SmolLM2-135M-Instruct from the bundled Q4_1 GGUF, dequantized (as tests/conftest.py's real_folder)."""
    from backends.folders.gguf_folder import convert
    from billion.models import MODELS, bundled_gguf

    home = os.environ.get("BILLION_HOME", os.path.expanduser("~/.cache/billion"))
    return convert(bundled_gguf(MODELS["smollm2-135m"]), Path(home) / "models", progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="torch,mlx", help="comma-separated engines (default torch,mlx)")
    ap.add_argument("-m", "--model", default=None,
                    help="a model spec (billion.loading.resolve); default SmolLM2-135M-Instruct from its bundled GGUF")
    ap.add_argument("--schemas", default=str(SCHEMAS))
    ap.add_argument("--limit", type=int, default=None, help="only the first N schemas")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--max-batch", type=int, default=8, help="batch of the validity runs")
    ap.add_argument("--timing-prompts", type=int, default=8, help="prompts of the mask-cost runs")
    ap.add_argument("--timing-batches", default="1,8")
    ap.add_argument("--reps", type=int, default=3, help="constrained/unconstrained timing runs, alternating")
    ap.add_argument("--check-schemas", action="store_true",
                    help="only check the schemas (llguidance compiles them, valid JSON schemas), list refused features")
    ap.add_argument("--json", default=None, help="write every number and output here")
    args = ap.parse_args()

    items = json.loads(Path(args.schemas).read_text())
    problems = check_schemas(items)
    features = feature_support()
    if args.check_schemas:
        print(f"{len(items)} schemas in {args.schemas}: " + ("all compile in llguidance and are valid JSON schemas"
                                                            if not problems else f"{len(problems)} problems"))
        for p in problems:
            print("  " + p)
        print_features(features)
        raise SystemExit(1 if problems else 0)
    if problems:
        raise SystemExit("schemas that cannot be used:\n  " + "\n  ".join(problems))
    items = items[:args.limit] if args.limit else items
    grammars = [constraints.json_schema(item["schema"], f"schema {item['name']!r}") for item in items]

    if args.model:
        from billion.loading import resolve

        folder, weights = resolve(args.model, progress=False).folder, args.model
    else:
        folder = real_folder()
        weights = f"SmolLM2-135M-Instruct (bundled Q4_1 GGUF, dequantized: {folder.name})"
    report = {"weights": weights, "folder": str(folder), "max_tokens": args.max_tokens, "schemas_file": args.schemas,
              "machine": machine(), "features": features, "engines": {}}
    sizes = [int(b) for b in args.timing_batches.split(",") if b]
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        backend = backends.get(engine).load(folder, device="cpu", dtype="float32")
        print(f"{engine}: validity on {len(items)} schemas ...", flush=True)
        v = validity(backend, items, grammars, args.max_tokens, args.max_batch)
        n = min(args.timing_prompts, len(items))
        timings = []
        for b in sizes:
            print(f"{engine}: mask cost at batch {b} on {n} prompts ...", flush=True)
            timings.append(mask_cost(backend, items[:n], grammars[:n], args.max_tokens, b, args.reps))
        report["engines"][engine] = {"validity": summarize(v), "outputs": v.results, "mask_cost": timings,
                                     "versions": getattr(backend.info(), "versions", {})}
        del backend
    engines = list(report["engines"])
    if len(engines) > 1:
        texts = [[r["text"] for r in report["engines"][e]["outputs"]["constrained"]] for e in engines]
        differ = [items[i]["name"] for i in range(len(items)) if len({t[i] for t in texts}) > 1]
        report["same_constrained_texts"] = {"schemas": len(items), "same": len(items) - len(differ), "differ": differ}
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
