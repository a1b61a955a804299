"""KV sessions: the abstract session every engine returns, the prompt cache that keeps one
between prompts, and the one decode loop over a session that all engines share.

Framework-free: a session is fed token ids and answers numpy logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Sequence

import numpy as np

from backends import sampling
from backends.types import GenerationConfig


class KVSession(ABC):
    """A model plus its KV cache: feed tokens, read logits, roll back.

    Speculative decoding and log-likelihood scoring are written once on top of
    this (see backends/speculation.py and backends/scoring.py).
    """

    length: int = 0  # tokens in the cache

    @abstractmethod
    def feed(self, ids: Sequence[int], keep: int = 0) -> np.ndarray:
        """Append `ids` to the cache; return float32 logits [n, vocab] for the
        last `keep` positions (all positions when keep == 0)."""

    @abstractmethod
    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens."""


class PromptCache:
    """The KV session of a conversation so far, kept between prompts (chat turns, server requests).

    Holds (session, ids): the tokens the session's cache holds. A new prompt crops the session to
    the longest common prefix of `ids` and the prompt and feeds only the rest, so a conversation's
    next turn costs its new tokens, not the whole transcript. A prefix's KV cache is exactly that
    prefix's, so cropping is always correct: an edited history or a new system message (a common
    prefix shorter than the cached ids) keeps only what is still shared, nothing at all when the
    first token differs. `reset()` forgets everything (/clear). Not thread-safe: one generation
    at a time (billion chat's conversation; the server's prompt cache is its batch's, backends/batching.py).
    """

    def __init__(self, backend):
        self.backend = backend  # a Backend (anything with session())
        self.session: KVSession | None = None
        self.ids: list[int] = []
        self.reused = 0  # prompt tokens the last prompt found in the cache

    def reset(self) -> None:
        self.session, self.ids, self.reused = None, [], 0

    def take(self, prompt_ids: Sequence[int]) -> KVSession:
        """The session, cropped to what it shares with `prompt_ids` (at most all but the last
        prompt token, which is fed again for the next-token logits); self.ids is that prefix."""
        n = 0
        limit = min(len(self.ids), len(prompt_ids) - 1)
        while n < limit and self.ids[n] == prompt_ids[n]:
            n += 1
        if self.session is None or n == 0:
            self.session, self.ids = self.backend.session(), []
        else:
            self.session.crop(n)
            del self.ids[n:]
        self.reused = n
        return self.session


def session_tokens(model, prompt_ids: list[int], gen: GenerationConfig,
                   cache: PromptCache | None = None) -> Iterator[int]:
    """Yield up to gen.max_tokens token ids (no EOS handling) from a KV session: the one decode
    loop both engines share, sampling with backends/sampling.py (numpy's generator seeded with
    gen.seed), so both draw the same tokens given the same logits. `model`: anything with
    session() (a Backend). With `cache`, the conversation's session is reused (PromptCache.take)
    and left holding the prompt and the tokens fed after it. With gen.grammar, every token is one
    the grammar allows (model.grammars)."""
    rng = np.random.default_rng(gen.seed)
    matcher = model.grammars.matcher(gen.grammar) if gen.grammar is not None else None
    session = cache.take(prompt_ids) if cache is not None else model.session()
    fed = cache.ids if cache is not None else []
    output: list[int] = []
    try:
        logits = session.feed(prompt_ids[len(fed):], keep=1)[-1]
        fed.extend(prompt_ids[len(fed):])
        for n in range(gen.max_tokens):
            allowed = matcher.allowed() if matcher else None
            token = sampling.sample(sampling.distribution(logits, gen, prompt_ids, output, allowed), rng)
            if matcher:
                matcher.advance(token)
            output.append(token)
            yield token
            if n + 1 == gen.max_tokens:
                break
            logits = session.feed([token], keep=1)[-1]
            fed.append(token)
    except BaseException as e:
        # a feed that failed or was interrupted (Ctrl-C) leaves the cache in an unknown state;
        # closing the generator (GeneratorExit, at a yield) leaves it exactly as `fed` says
        if cache is not None and not isinstance(e, GeneratorExit):
            cache.reset()
        raise
