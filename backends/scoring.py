"""Log-likelihood scoring with lm-evaluation-harness's semantics (its TemplateLM.loglikelihood
and HF model): how a (context, continuation) pair is encoded, what an empty context is
conditioned on, how a long row is cut, and how pairs are scored over KV sessions or padded batches.

`backend` below is a Backend (backends/base.py); only its tokenizer, eos_ids, context_length,
tokenize, check_fits, session and batch_logits are used.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from backends import sampling
from backends.batching import common_prefix
from backends.types import UserError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- encoding


def prefix_token_id(backend) -> int:
    """The token an empty context is conditioned on: BOS when the tokenizer has one, else
    EOS (lm-eval's HF model, `prefix_token_id`)."""
    for token in (getattr(backend.tokenizer, "bos_token_id", None), getattr(backend.tokenizer, "eos_token_id", None)):
        if token is not None:
            return int(token)
    if backend.eos_ids:
        return min(backend.eos_ids)
    raise UserError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")


def encode_scored(backend, text: str) -> list[int]:
    """Token ids of a text to score, as lm-eval's HF model encodes it (`tok_encode`): the
    tokenizer's own special tokens, except when the text already starts with the prefix
    token's text (a chat-templated prompt carrying its BOS), which is not doubled."""
    prefix = backend.tokenizer.decode([backend.prefix_token_id], skip_special_tokens=False)
    return backend.tokenize(text, add_special_tokens=not (prefix and text.startswith(prefix)))


def encode_pair(backend, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), exactly as lm-evaluation-harness encodes a pair.

    ALL trailing whitespace of the context moves into the continuation (`_encode_pair`:
    `context.rstrip()`); the continuation's tokens are those of encode_scored(context +
    continuation) past encode_scored(context). An empty context is the prefix token
    (BOS, else EOS) and the continuation is encoded without special tokens; if it
    already starts with that token, that token is the context instead.
    """
    if context == "":
        cont = backend.tokenize(continuation, add_special_tokens=False)
        prefix = backend.prefix_token_id
        return (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = backend.encode_scored(context + continuation)
    ctx = backend.encode_scored(context)
    return whole[: len(ctx)], whole[len(ctx):]


def scoring_context(backend, ctx: Sequence[int]) -> list[int]:
    """The context a continuation is scored after: an empty one (a whitespace-only context
    whose spaces moved into the continuation) becomes the prefix token, BOS else EOS, as
    lm-eval conditions an empty context."""
    return list(ctx) if ctx else [backend.prefix_token_id]


def fit_left(backend, ctx: Sequence[int], cont: Sequence[int],
             max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Cut the context on the left so that the scored row (context + continuation[:-1]) is at
    most max_length tokens (default: the model's context), as lm-eval's HF model does; the
    continuation is never cut."""
    ctx = scoring_context(backend, ctx)
    limit = min(max_length or backend.context_length, backend.context_length)
    room = limit + 1 - len(cont)
    if room < 1:
        raise UserError(f"a continuation of {len(cont)} tokens does not fit in {limit} tokens")
    return list(ctx[-room:]) if len(ctx) > room else list(ctx), list(cont)


# ---------------------------------------------------------------- scoring


def score(backend, pairs: Sequence[tuple[str, str]], batch_size: int = 1, *,
          truncate: int | None = None) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation given its context: (sum of log-probabilities,
    whether every token was the argmax), for Backend.score (which documents it)."""
    encoded = [backend.encode_pair(c, x) for c, x in pairs]
    if truncate is not None:
        encoded = [fit_left(backend, ctx, cont, truncate) for ctx, cont in encoded]
    if batch_size > 1:
        return score_batched(backend, encoded, batch_size)
    return score_encoded(backend, encoded)


def score_encoded(backend, encoded: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """Score (context ids, continuation ids) pairs; a context shared by
    consecutive pairs is fed once and its cache cropped back after each
    continuation."""
    results: list[tuple[float, bool]] = []
    session, current_ctx, ctx_logits = None, None, None
    for ctx, cont in encoded:
        if not cont:
            raise UserError("empty continuation")
        ctx = scoring_context(backend, ctx)
        backend.check_fits(len(ctx) + len(cont) - 1)
        if ctx != current_ctx:
            session = backend.session()
            ctx_logits = session.feed(ctx, keep=1)[-1]
            current_ctx = ctx
        logits = [ctx_logits]
        if len(cont) > 1:
            logits.extend(session.feed(cont[:-1]))
            session.crop(len(ctx))
        logp = log_softmax(np.stack(logits))
        total = float(sum(logp[i, t] for i, t in enumerate(cont)))
        greedy = all(int(np.argmax(logp[i])) == t for i, t in enumerate(cont))
        results.append((total, greedy))
    return results


def score_batched(backend, encoded: Sequence[tuple[list[int], list[int]]],
                  batch_size: int) -> list[tuple[float, bool]]:
    """Score (context ids, continuation ids) pairs in padded batches, as
    lm-evaluation-harness does: each pair is the row context + continuation[:-1];
    pairs with the same row (one context with one-token continuations, such as
    MMLU's " A" ... " D") share it; rows run longest first, batch_size at a time."""
    rows: dict[tuple, list[int]] = {}  # row -> indices of the pairs it scores
    fixed = []
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise UserError("empty continuation")
        ctx = scoring_context(backend, ctx)
        row = tuple(ctx) + tuple(cont[:-1])
        backend.check_fits(len(row))
        rows.setdefault(row, []).append(i)
        fixed.append((ctx, cont))
    results: list = [None] * len(encoded)
    order = sorted(rows, key=len, reverse=True)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        # positions whose next-token logits score some continuation of this row
        positions = [sorted({p for i in rows[r] for p in range(len(fixed[i][0]) - 1, len(r))}) for r in chunk]
        for r, pos, logits in zip(chunk, positions, backend.batch_logits([list(r) for r in chunk], positions)):
            logp = dict(zip(pos, log_softmax(logits)))
            for i in rows[r]:
                ctx, cont = fixed[i]
                steps = [logp[len(ctx) - 1 + k] for k in range(len(cont))]
                results[i] = (float(sum(s[t] for s, t in zip(steps, cont))),
                              all(int(np.argmax(s)) == t for s, t in zip(steps, cont)))
    return results


# ---------------------------------------------------------------- a prompt's own log-probabilities


class PromptLogprobs:
    """A prompt's own tokens' log-probabilities (each given the tokens before it; the first has
    none): what the server's `echo` with `logprobs` answers, so lm-eval scores over HTTP.

    It keeps the last prompt's KV session and its values: a prompt that shares a prefix with the
    last one (lm-eval sends each answer of a question as its own request, the same few-shot
    context before each) reuses the prefix's values and feeds only the rest, so a question costs
    about one forward pass over HTTP as in process (score_encoded feeds a shared context once).
    The values reused are those the same feed gives (causal: a position's logits see only the
    tokens before it). `salt`: reuse only between prompts of the same prompt-cache partition
    (the server's cache_salt and API key), as the batch's prompt cache does."""

    def __init__(self, backend):
        self.backend = backend
        self.session = None
        self.ids: list[int] = []  # the last prompt; the session holds all of it but its last token
        self.values: list[tuple] = []  # its (log-probability, top (id, log-probability) pairs), from ids[1]
        self.key: tuple = ()  # (top, salt) the values were computed for
        self.fed = 0  # tokens fed so far (what reuse saves is counted in tests)

    def __call__(self, ids, top: int, salt: str | None = None) -> list[tuple]:
        """(log-probability, top pairs) of ids[1:], as sampling.logprobs_of gives them."""
        ids = list(ids)
        same = common_prefix(ids, self.ids) if self.session is not None and self.key == (top, salt) else 0
        if same < 2:  # nothing to reuse: a fresh session
            self.session, self.values, same = self.backend.session(), [], 1
        else:
            self.session.crop(same - 1)
            del self.values[same - 1:]
        rest = ids[same - 1:len(ids) - 1]  # the tokens whose logits score ids[same:]
        if rest:
            try:
                logits = self.session.feed(rest)
            except BaseException:
                self.session = None  # half fed: start afresh next time
                raise
            self.fed += len(rest)
            self.values += sampling.logprobs_of(logits, ids[same:], top)
        self.ids, self.key = ids, (top, salt)
        return list(self.values)
