"""MMLU, scored the way lm-evaluation-harness scores it, on any engine.

The prompt (lm-eval's `mmlu` task, the format of Hendrycks et al.):

    The following are multiple choice questions (with answers) about <subject>.

    <dev question 1>
    A. <choice>
    B. <choice>
    C. <choice>
    D. <choice>
    Answer: <letter>

    ... (k solved examples: the first k of the subject's dev split)

    <test question>
    A. ...
    D. <choice>
    Answer:

`loglik` (the default, what model cards quote with 5 shots): the prediction is
the choice whose continuation " A" / " B" / " C" / " D" has the highest
log-likelihood. `generate` (the seed project's method, kept for comparison):
greedy generation of a few tokens, the first letter A-D found in them is the
prediction (none found: wrong).

Prompt building, scoring and statistics live here once; engines only supply
`score`/`batch_logits` and `generate` (backends/base.py).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from backends.base import Backend
from backends.scoring import score_batched
from backends.types import GenerationConfig, UserError
from billion.tasks.mmlu_data import LETTERS, Question, Subject

METHODS = ("loglik", "generate")
MAX_SHOTS = 5  # the dev split holds 5 questions per subject


@dataclass(frozen=True)
class MMLUConfig:
    subjects: tuple[str, ...]
    shots: int = 5
    method: str = "loglik"
    limit: int | None = None  # test questions per subject (the first N)
    batch_size: int = 4  # questions per forward pass (loglik)
    max_tokens: int = 5  # generate: tokens generated per question
    data: str = "cais/mmlu"

    def __post_init__(self):
        if not 0 <= self.shots <= MAX_SHOTS:
            raise UserError(f"--shots must be 0 to {MAX_SHOTS} (the dev split holds {MAX_SHOTS} examples)")
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")


@dataclass(frozen=True)
class Scored:
    """One test question, scored."""

    subject: str
    index: int  # position in the subject's test split
    answer: int
    pred: int  # 0..3, or -1 when generate found no letter
    logprobs: tuple[float, ...] | None = None  # loglik: of " A" ... " D"
    truncated: bool = False  # the prompt was cut on the left to fit the context
    output: str | None = None  # generate: the generated text
    prompt_tokens: int = 0  # what the model read (after any cut): speed depends on it

    @property
    def key(self) -> tuple[str, int]:
        return self.subject, self.index

    @classmethod
    def from_json(cls, d: dict) -> "Scored":
        """A checkpoint line back as a Scored (JSON made the log-probabilities a list)."""
        return cls(**{**d, "logprobs": tuple(d["logprobs"]) if d.get("logprobs") else None})


@dataclass
class MMLUResult:
    config: MMLUConfig
    scored: dict = field(default_factory=dict)  # (subject, index) -> Scored, resumed ones included
    new: int = 0  # questions scored in this run
    seconds: float = 0.0  # time spent scoring them
    # whether prompts start with BOS (the tokenizer's default, as mlx_lm.evaluate does; lm-eval's
    # HF model leaves BOS out unless add_bos_token=True): it moves accuracy, so records say it
    bos_prepended: bool | None = None


# ---------------------------------------------------------------- prompts


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(q: Question) -> str:
    """lm-eval's doc_to_text: the stripped question, the four choices, "Answer:"."""
    lines = [q.question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
    return "\n".join(lines) + "\nAnswer:"


def build_prompt(subject: Subject, q: Question, shots: int) -> str:
    """Header + the first `shots` dev questions solved (" <letter>", blank line after each) + the question."""
    if shots > len(subject.dev):
        raise UserError(f"{subject.name}: {shots} shots asked for but its dev split has {len(subject.dev)} questions")
    examples = "".join(f"{format_question(d)} {LETTERS[d.answer]}\n\n" for d in subject.dev[:shots])
    return header(subject.name) + examples + format_question(q)


# ---------------------------------------------------------------- scoring


def _fit_left(ids: list[int], room: int) -> tuple[list[int], bool]:
    """lm-eval truncates over-long contexts on the left (the header and first shots go first)."""
    return (ids, False) if len(ids) <= room else (ids[len(ids) - room:], True)


def score_loglik(backend: Backend, subject: Subject, items: list[tuple[int, Question]], prompts: list[str],
                 batch_size: int) -> list[Scored]:
    encoded, truncated, lengths = [], [], []
    for prompt in prompts:
        pairs = [backend.encode_pair(prompt, f" {letter}") for letter in LETTERS]
        cut = False
        for k, (ctx, cont) in enumerate(pairs):
            ctx, c = _fit_left(ctx, backend.context_length - len(cont) + 1)
            pairs[k], cut = (ctx, cont), cut or c
        encoded.extend(pairs)
        truncated.append(cut)
        lengths.append(len(pairs[0][0]))
    # one-token continuations share their context's row: batch_size questions per forward pass
    scores = score_batched(backend, encoded, batch_size)
    out = []
    for n, ((index, q), cut, length) in enumerate(zip(items, truncated, lengths)):
        lps = tuple(s for s, _ in scores[4 * n: 4 * n + 4])
        out.append(Scored(subject.name, index, q.answer, max(range(4), key=lambda k: lps[k]), lps, cut, None, length))
    return out


_LETTER = re.compile(r"\b([ABCD])\b")


def parse_letter(text: str) -> int:
    """The first standalone A-D in generated text (the seed project's parse), or -1."""
    m = _LETTER.search(text)
    return LETTERS.index(m.group(1)) if m else -1


def score_generate(backend: Backend, subject: Subject, index: int, q: Question, prompt: str,
                   max_tokens: int) -> Scored:
    ids, cut = _fit_left(backend.tokenize(prompt), backend.context_length - max_tokens)
    text = backend.detokenize(backend.generate(ids, GenerationConfig(max_tokens=max_tokens)))
    return Scored(subject.name, index, q.answer, parse_letter(text), None, cut, text, len(ids))


def run_mmlu(backend: Backend, subjects: list[Subject], cfg: MMLUConfig, *, done: Iterable[Scored] = (),
             on_scored: Callable[[list[Scored]], None] | None = None,
             result: MMLUResult | None = None) -> MMLUResult:
    """Score every test question of `subjects` (the first cfg.limit of each) not already `done`.

    Questions of a subject run longest prompt first (as lm-eval orders them: padding
    stays small and a prompt too big for memory fails at once). The result fills as
    batches finish, so a caller that passes `result` keeps what was scored if Ctrl-C
    stops the run.
    """
    wanted = {(s.name, i) for s in subjects for i in range(len(s.test[: cfg.limit]))}
    result = result or MMLUResult(cfg)
    result.scored.update((s.key, s) for s in done if s.key in wanted)
    bos = getattr(backend.tokenizer, "bos_token_id", None)
    result.bos_prepended = bos is not None and backend.tokenize("Answer:")[:1] == [bos]
    for subject in subjects:
        pending = [(i, q) for i, q in enumerate(subject.test[: cfg.limit])
                   if (subject.name, i) not in result.scored]
        prompts = {i: build_prompt(subject, q, cfg.shots) for i, q in pending}
        pending.sort(key=lambda iq: len(prompts[iq[0]]), reverse=True)
        step = cfg.batch_size if cfg.method == "loglik" else 1
        for start in range(0, len(pending), step):
            chunk = pending[start:start + step]
            t0 = time.perf_counter()
            if cfg.method == "loglik":
                batch = score_loglik(backend, subject, chunk, [prompts[i] for i, _ in chunk], cfg.batch_size)
            else:
                batch = [score_generate(backend, subject, i, q, prompts[i], cfg.max_tokens) for i, q in chunk]
            result.seconds += time.perf_counter() - t0
            result.new += len(batch)
            result.scored.update((s.key, s) for s in batch)
            if on_scored:
                on_scored(batch)
    return result


def count_questions(subjects: Iterable[Subject], limit: int | None) -> int:
    return sum(len(s.test[:limit]) for s in subjects)


# ---------------------------------------------------------------- statistics


def _mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as lm-eval reports)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarise(result: MMLUResult, subject_order: list[str]) -> dict:
    """Accuracy per subject, micro (every question weighs the same, as lm-eval's
    group score) and macro (every subject weighs the same), with standard errors."""
    by_subject: dict[str, list[Scored]] = {}
    for s in result.scored.values():
        by_subject.setdefault(s.subject, []).append(s)
    per_subject = {}
    for name in subject_order:
        items = by_subject.get(name)
        if items:
            acc, se = _mean_stderr([float(s.pred == s.answer) for s in items])
            per_subject[name] = {"acc": acc, "acc_stderr": se, "questions": len(items)}
    everything = [float(s.pred == s.answer) for s in result.scored.values()]
    # key order: what reports show first
    metrics = {"shots": result.config.shots, "method": result.config.method, "questions": len(everything),
               "acc_micro": None, "acc_micro_stderr": None, "acc_macro": None, "acc_macro_stderr": None,
               "questions_per_s": result.new / result.seconds if result.seconds else None,
               "prompt_tokens_mean": sum(s.prompt_tokens for s in result.scored.values()) / max(len(everything), 1),
               "subjects": len(per_subject)}
    if everything:
        metrics["acc_micro"], metrics["acc_micro_stderr"] = _mean_stderr(everything)
        accs = [v["acc"] for v in per_subject.values()]
        metrics["acc_macro"] = sum(accs) / len(accs)
        ses = [v["acc_stderr"] for v in per_subject.values()]
        metrics["acc_macro_stderr"] = (math.sqrt(sum(se ** 2 for se in ses)) / len(ses)
                                       if all(se is not None for se in ses) else None)
    metrics["bos_prepended"] = result.bos_prepended
    metrics["questions_scored_this_run"] = result.new
    metrics["truncated_prompts"] = sum(s.truncated for s in result.scored.values())
    if result.config.method == "generate":
        metrics["unparsed_answers"] = sum(s.pred < 0 for s in result.scored.values())
    metrics["per_subject"] = per_subject
    return metrics


def bench_metrics(metrics: dict) -> dict:
    """The summary `billion bench --mmlu` puts next to speed and memory."""
    return {"mmlu_acc": metrics.get("acc_micro"), "mmlu_acc_stderr": metrics.get("acc_micro_stderr"),
            "mmlu_questions": metrics["questions"], "mmlu_shots": metrics["shots"], "mmlu_method": metrics["method"],
            "mmlu_questions_per_s": metrics["questions_per_s"]}


def predictions(result: MMLUResult) -> dict[str, str]:
    """Predicted letters per subject in test order ('-': no answer parsed), for comparing records."""
    out: dict[str, list[str]] = {}
    for s in sorted(result.scored.values(), key=lambda s: s.key):
        out.setdefault(s.subject, []).append(LETTERS[s.pred] if s.pred >= 0 else "-")
    return {k: "".join(v) for k, v in out.items()}


def agreement(a: MMLUResult, b: MMLUResult) -> dict:
    """How often two engines chose the same answer, and their largest log-likelihood difference."""
    common = sorted(set(a.scored) & set(b.scored))
    out = {"questions_compared": len(common)}
    if not common:
        return out
    out["same_answer_share"] = sum(a.scored[k].pred == b.scored[k].pred for k in common) / len(common)
    diffs = [abs(x - y) for k in common if a.scored[k].logprobs and b.scored[k].logprobs
             for x, y in zip(a.scored[k].logprobs, b.scored[k].logprobs)]
    out["max_abs_loglik_diff"] = max(diffs) if diffs else None
    return out
