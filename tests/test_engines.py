"""Both engines on the same tiny folders: same tokens, same greedy output, close logits."""

from __future__ import annotations

import numpy as np
import pytest

from backends.types import GenerationConfig, UserError
from tests.conftest import ENGINES, FAMILIES

PROMPT = "Why is the sky blue? Sunlight scatters off"

# GPT-NeoX: mlx-lm uses the tanh GELU approximation where the config says exact GELU.
LOGIT_TOLERANCE = {"pythia-1b": 5e-3}


@pytest.mark.parametrize("alias", FAMILIES)
def test_same_tokens_greedy_and_logits(tiny_model, alias):
    mlx, torch = tiny_model("mlx", alias), tiny_model("torch", alias)
    ids = mlx.tokenize(PROMPT)
    assert ids == torch.tokenize(PROMPT)
    gen = GenerationConfig(max_tokens=24, ignore_eos=True)
    out_mlx, out_torch = mlx.generate(ids, gen), torch.generate(ids, gen)
    assert len(out_mlx) == 24
    assert out_mlx == out_torch
    diff = np.abs(mlx.logits(ids) - torch.logits(ids)).max()
    assert diff < LOGIT_TOLERANCE.get(alias, 1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_stream_text_matches_detokenize(tiny_model, engine):
    b = tiny_model(engine)
    ids = b.tokenize(PROMPT)
    chunks = list(b.stream(ids, GenerationConfig(max_tokens=20, ignore_eos=True)))
    assert "".join(c.text for c in chunks) == b.detokenize([c.token for c in chunks])
    times = [c.time_s for c in chunks]
    assert times == sorted(times)


@pytest.mark.parametrize("engine", ENGINES)
def test_stops_at_eos_unless_ignored(tiny_model, engine):
    b = tiny_model(engine)
    ids = b.tokenize(PROMPT)
    free = b.generate(ids, GenerationConfig(max_tokens=30, ignore_eos=True))
    # Make the first generated token an EOS: generation must stop before yielding it.
    eos = free[0]
    object.__setattr__(b, "eos_ids", frozenset({eos}))
    try:
        assert b.generate(ids, GenerationConfig(max_tokens=30)) == []
        assert b.generate(ids, GenerationConfig(max_tokens=30, ignore_eos=True)) == free
    finally:
        from backends.folders import hf_folder

        b.eos_ids = hf_folder.eos_ids(b.path, b.tokenizer)


@pytest.mark.parametrize("engine", ENGINES)
def test_sampling_is_seeded(tiny_model, engine):
    b = tiny_model(engine)
    ids = b.tokenize(PROMPT)
    gen = GenerationConfig(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    assert b.generate(ids, gen) == b.generate(ids, gen)


@pytest.mark.parametrize("engine", ENGINES)
def test_prompt_longer_than_context_is_refused(tiny_model, engine):
    b = tiny_model(engine)
    with pytest.raises(UserError, match="longer than the model's context"):
        list(b.stream([5] * (b.context_length + 1), GenerationConfig(max_tokens=1)))


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_template_and_info(tiny_model, engine):
    b = tiny_model(engine, "llama-3.2-1b")
    ids = b.apply_chat_template([{"role": "user", "content": "hi"}])
    text = b.tokenizer.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    info = b.info()
    assert info.backend == engine and info.dtype == "float32" and info.device == "cpu"
    # tied embeddings: the output head reads the whole table every token
    assert info.decode_bytes_per_token == info.weight_bytes
    assert info.parameters == tiny_model("mlx", "llama-3.2-1b").info().parameters


def test_kv_session_crop_matches_fresh(tiny_model):
    for engine in ENGINES:
        b = tiny_model(engine)
        ids = b.tokenize(PROMPT)
        s = b.session()
        s.feed(ids)
        s.feed([7, 8, 9])
        s.crop(len(ids))
        again = s.feed([10, 11], keep=1)
        fresh = b.logits(ids + [10, 11])[-1:]
        assert np.abs(again - fresh).max() < 1e-4


def test_score_agrees_across_engines(tiny_model):
    pairs = [("The sky is", " blue"), ("The sky is", " red"), ("Water boils at ", "100 degrees")]
    a, b = tiny_model("mlx").score(pairs), tiny_model("torch").score(pairs)
    for (la, ga), (lb, gb) in zip(a, b):
        assert abs(la - lb) < 1e-3 and ga == gb
    # a trailing space in the context belongs to the continuation (lm-eval semantics)
    m = tiny_model("torch")
    assert m.encode_pair("Water boils at ", "100") == m.encode_pair("Water boils at", " 100")
