"""The one timed stream: decode rate, draft share and why generation stopped."""

from __future__ import annotations

import math

import pytest

from backends.types import Chunk, GenerationConfig
from billion.tasks.timing import TimedStream, decode_rate


def chunks(times, last_reason=None, draft=()):
    for i, t in enumerate(times):
        yield Chunk(i, str(i), t, i in draft, last_reason if i == len(times) - 1 else None)


def test_decode_rate_counts_tokens_after_the_first():
    assert decode_rate([10.0, 10.5, 11.0, 12.0]) == 1.5  # 3 tokens in 2 s
    assert math.isnan(decode_rate([1.0]))


def test_stream_figures_and_finish_reasons():
    run = TimedStream(chunks([5.0, 6.0, 7.0], draft={1})).consume()
    assert run.tokens == [0, 1, 2] and run.from_draft == 1 and run.decode_tps == 1.0
    assert run.finish_reason == "eos"  # ended without a max_tokens chunk
    assert TimedStream(chunks([1.0, 2.0], "max_tokens")).consume().finish_reason == "max_tokens"
    early = TimedStream(chunks([1.0, 2.0, 3.0]))
    it = iter(early)
    next(it)
    it.close()
    assert early.finish_reason == "interrupted" and early.tokens == [0]


@pytest.mark.parametrize("engine", ["torch", "mlx"])
def test_engines_mark_the_last_chunk(tiny_model, engine):
    model = tiny_model(engine)
    out = list(model.stream([3, 4, 5], GenerationConfig(max_tokens=4, ignore_eos=True)))
    assert [c.finish_reason for c in out] == [None, None, None, "max_tokens"]
