"""The prompt cache (backends.batching.PromptCache): a conversation's batch of one kept turn to turn,
its KV session cropped to the common prefix, reset on /clear and a new system message; same
replies as without."""

from __future__ import annotations

import numpy as np
import pytest

from backends.batching import BatchGenerator, PromptCache
from backends.sessions import SessionBatchCache
from backends.types import GenerationConfig
from billion.tasks.chat import Chat
from tests.conftest import ENGINES

MESSAGES = ["Why is the sky blue?", "And the sea?", "Tell me about clouds.", "Thanks!"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recording:
    """A stand-in engine recording what its sessions are fed and cropped to."""

    eos_ids = frozenset()

    class tokenizer:  # noqa: N801 - no text: the test follows the tokens
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return ""

    def __init__(self):
        self.log = []

    def batch(self, max_batch, prompt_cache_size, draft=None, num_draft=4):
        return BatchGenerator(SessionBatchCache(self), self.eos_ids, max_batch=1, prompt_cache_size=prompt_cache_size)

    def session(self):
        log = self.log
        log.append(("new",))

        class Session:
            length = 0

            def feed(self, ids, keep=0):
                log.append(("feed", list(ids)))
                self.length += len(ids)
                row = np.zeros(8, dtype=np.float32)
                row[(self.length * 3) % 8] = 1.0  # greedy: token (3 * length) % 8
                return np.tile(row, (keep or len(ids), 1))

            def crop(self, length):
                log.append(("crop", length))
                self.length = min(self.length, length)

        return Session()


def test_common_prefix_is_kept_and_only_the_rest_fed():
    engine = Recording()
    cache = PromptCache(engine)
    gen = GenerationConfig(max_tokens=3)
    first = [c.token for c in cache.stream([1, 2, 3], gen)]
    ((key, session),) = cache.batch.prompt_cache.items()
    assert key == (None, 1, 2, 3, *first[:-1]) and session.length == len(key) - 1  # the last is not fed
    engine.log.clear()
    second = [1, 2, 3] + first + [5, 6]
    list(cache.stream(second, gen))
    assert engine.log[:2] == [("crop", 5), ("feed", [first[-1], 5, 6])] and cache.reused == 5
    engine.log.clear()
    list(cache.stream([1, 2, 9], gen))  # an edited history: only [1, 2] is shared
    assert engine.log[:2] == [("crop", 2), ("feed", [9])] and cache.reused == 2
    engine.log.clear()
    list(cache.stream([1, 2], gen))  # all cached: the last token is fed again for its logits
    assert engine.log[:2] == [("crop", 1), ("feed", [2])]
    engine.log.clear()
    list(cache.stream([7, 1, 2], gen))  # nothing shared: a fresh session
    assert engine.log[:2] == [("new",), ("feed", [7, 1, 2])] and cache.reused == 0


def converse(chat: Chat, messages=MESSAGES) -> list:
    out = []
    for text in messages:
        reply = chat.ask(text)
        list(reply.pieces())
        out.append((reply.token_ids, reply.stats.cached_tokens, len(reply.prompt_ids)))
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_reuses_the_conversation_and_replies_the_same(tiny_model, engine):
    backend = tiny_model(engine)
    gen = GenerationConfig(max_tokens=10)
    cached = converse(Chat(backend, gen, system="Be brief."))
    plain = converse(Chat(backend, gen, system="Be brief.", prompt_cache=False))
    assert [c[0] for c in cached] == [p[0] for p in plain]  # the same greedy replies
    assert cached[0][1] == 0 and all(c[1] > 0 for c in cached[1:]) and all(p[1] == 0 for p in plain)
    # from turn 2 on, the previous prompt (give or take a token where the reply's text meets it)
    # is found in the cache
    assert all(cached[i][1] >= cached[i - 1][2] - 2 for i in range(1, len(cached)))


@pytest.mark.parametrize("engine", ENGINES)
def test_clear_new_system_and_edited_history(tiny_model, engine):
    backend = tiny_model(engine)
    gen = GenerationConfig(max_tokens=8)
    chat = Chat(backend, gen, system="Be brief.")
    converse(chat, MESSAGES[:2])
    assert chat.cache.batch is not None
    chat.clear()
    assert chat.cache.batch is None
    converse(chat, MESSAGES[:2])
    chat.system = "Be long."
    reply = chat.ask(MESSAGES[2])
    assert chat.cache.batch is None  # reset before the new prompt is fed
    list(reply.pieces())
    # an edited history: only the shared prefix is reused, and the reply is the uncached one
    chat.turns[0]["content"] = "Why is grass green?"
    reply = chat.ask(MESSAGES[3])
    list(reply.pieces())
    fresh = Chat(backend, gen, system="Be long.", prompt_cache=False)
    fresh.turns = [dict(t) for t in chat.turns[:-2]]
    again = fresh.ask(MESSAGES[3])
    list(again.pieces())
    assert reply.token_ids == again.token_ids
    assert 0 < reply.stats.cached_tokens < len(backend.apply_chat_template(
        [{"role": "system", "content": "Be long."}, *chat.turns[:2]], add_generation_prompt=False))
