"""Constrained decoding: a grammar's mask over the vocabulary, the same on every engine.

A grammar (a JSON schema, a regular expression or a Lark grammar) is compiled by llguidance
(https://github.com/guidance-ai/llguidance) into its own grammar text, which travels in
GenerationConfig.grammar. Each generation gets a Matcher of its own (the grammar's state after the
tokens so far): before each token it says which tokens keep the text inside the grammar, and
sampling.distribution draws only from those, on float32 logits, the same way for MLX, torch and
llama.cpp. EOS is allowed only where the grammar may end, and once it must end EOS is the only
token left, so a generation that stops at EOS is always valid (one cut by max_tokens is not).

Why llguidance: it computes a mask for a 49k vocabulary in tens of microseconds on a CPU with no
warm-up compilation, builds its tokenizer view from the Hugging Face tokenizer every engine here
already shares, takes a token back (rollback: rejected speculative drafts), reports the JSON-schema
keywords it cannot enforce as errors instead of ignoring them (strict by default: fail closed), and
has lazy grammars (a tool call constrained only from its trigger on). It needs no torch or mlx.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np

from backends.types import UserError


class ConstraintError(UserError):
    """A grammar that cannot be enforced (an unsupported JSON-schema keyword, a bad regex...): the
    request is refused, never generated unconstrained."""


def _llg():
    try:
        import llguidance
    except ImportError as e:  # a dependency of billion's, but say what to do if it is missing
        raise UserError(f"constrained decoding needs llguidance ({e}): pip install llguidance") from None
    return llguidance


def checked(grammar: str, what: str) -> str:
    """`grammar` (llguidance's text) if llguidance can enforce it, else ConstraintError naming the
    part it cannot (llguidance's own message, e.g. 'Unimplemented keys: ["uniqueItems"]')."""
    is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        # regex errors come as several lines (the pattern, a ^^^ marker, the reason): one line
        lines = [line.strip() for line in (messages or ["?"])[0].splitlines()]
        raise ConstraintError(f"{what} cannot be enforced: "
                              + " ".join(line for line in lines if line and set(line) != {"^"}))
    return grammar


def json_schema(schema: dict | bool, what: str = "the JSON schema") -> str:
    """The grammar of JSON text valid under `schema` (compact separators, no extra whitespace:
    a small model given room for whitespace tends to spend its tokens on it)."""
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"{what} must be a JSON object")
    try:
        grammar = _llg().LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"{what} is not usable: {e}") from None
    return checked(grammar, what)


def json_object() -> str:
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    return json_schema({"type": "object"}, "a JSON object")


def regex(pattern: str) -> str:
    """Text matching the whole of `pattern` (Rust regex syntax: no look-around, no backreferences)."""
    return checked(_llg().LLMatcher.grammar_from_regex(pattern), f"the regular expression {pattern!r}")


def lark(text: str, what: str = "the grammar") -> str:
    """A Lark grammar in llguidance's dialect (may embed %json {...} schemas and lazy rules)."""
    return checked(_llg().LLMatcher.grammar_from_lark(text), what)


def schema_text(schema) -> str:
    """`schema` as JSON text (for embedding in a Lark grammar with %json)."""
    return json.dumps(schema, separators=(",", ":"))


class Grammars:
    """One model's view for llguidance: its tokenizer (built once, ~0.3 s for a 49k vocabulary, so
    lazily and only by the first constrained request), its logits' width and its EOS tokens.

    A grammar is compiled once: the last COMPILED grammars are kept as pristine matchers, and each
    generation gets a copy (LLMatcher.deep_copy). The server checks a request's grammar when it
    parses the request and its batch then starts from that same compiled grammar; clients that
    send the same schema request after request compile it once."""

    COMPILED = 32

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._ll = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, object] = OrderedDict()  # grammar text -> pristine LLMatcher

    def _tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                try:
                    self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                            eos_token=list(self.eos_ids))
                except ValueError as e:  # a slow (Python) tokenizer
                    raise UserError(f"constrained decoding needs a fast tokenizer: {e}") from None
            return self._ll

    def matcher(self, grammar: str) -> "Matcher":
        """A new generation's matcher at the start of `grammar` (ConstraintError if it cannot be enforced)."""
        tokenizer = self._tokenizer()
        with self._lock:
            pristine = self._compiled.pop(grammar, None)
            if pristine is None:
                pristine = _llg().LLMatcher(tokenizer, grammar, log_level=0)
                if pristine.is_error():
                    raise ConstraintError(f"the grammar cannot be enforced: {pristine.get_error()}")
            self._compiled[grammar] = pristine  # the most recently used last
            while len(self._compiled) > self.COMPILED:
                self._compiled.popitem(last=False)
            return Matcher(pristine.deep_copy(), self.vocab_size)


class Matcher:
    """One generation's place in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self.m, self.vocab_size = matcher, vocab_size

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens that keep the text inside the grammar (only EOS once it is complete)."""
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)

    def advance(self, token: int) -> None:
        """Take `token` (one the mask allowed: anything else is a bug, not a user's mistake)."""
        if not self.m.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.m.get_error()}")

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` the grammar takes in a row from here (nothing is consumed)."""
        return self.m.validate_tokens(list(tokens)) if tokens else 0

    def rollback(self, count: int) -> None:
        if count:
            self.m.rollback(count)
