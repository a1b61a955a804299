"""The registry: exact architectures, aliases, specs, synthetic folders."""

from __future__ import annotations

import json

import pytest

from backends.types import UserError
from backends.folders.synthetic import count_parameters
from billion.models import MODELS, card_for, parse_spec


@pytest.mark.parametrize("alias", list(MODELS))
def test_published_parameter_count_matches_architecture(alias):
    card = MODELS[alias]
    # built on the meta device from the Hub config: no weights, exact count
    assert count_parameters(card.config) == card.parameters


@pytest.mark.parametrize("name,alias", [
    ("tinyllama", "tinyllama"), ("llama", "tinyllama"), ("llama-3.2-1b", "llama-3.2-1b"),
    ("llama3.2-1b", "llama-3.2-1b"), ("stablelm", "stablelm-2-1.6b"), ("pythia", "pythia-1b"),
    ("EleutherAI/pythia-1b", "pythia-1b"), ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "tinyllama"),
])
def test_aliases(name, alias):
    assert card_for(name).alias == alias
    spec = parse_spec(name)
    assert spec.kind == "hub" and spec.hub_id == MODELS[alias].hub_id


def test_specs(tmp_path):
    assert parse_spec("random:llama").kind == "random"
    assert parse_spec("random:llama").card.alias == "tinyllama"
    assert parse_spec("tiny:pythia-1b").kind == "tiny"
    assert parse_spec(str(tmp_path)).kind == "folder"
    assert parse_spec("org/some-model").hub_id == "org/some-model"
    with pytest.raises(UserError, match="known models: tinyllama"):
        parse_spec("gpt-17")
    for bad in ("nope/", "a b/c", "org/name/extra"):
        with pytest.raises(UserError, match="not a folder, an alias or a Hub id"):
            parse_spec(bad)
    with pytest.raises(UserError, match="unknown model 'nope'"):
        parse_spec("random:nope")


def test_llama32_is_gated_with_login_hint():
    card = MODELS["llama-3.2-1b"]
    assert card.gated and "hf auth login" in card.licence


@pytest.mark.parametrize("alias", list(MODELS))
def test_tiny_folder_keeps_hub_config_keys(tiny_folder, alias):
    config = json.loads((tiny_folder(alias) / "config.json").read_text())
    hub = MODELS[alias].config
    assert "rope_parameters" not in config
    assert set(hub) <= set(config)
    for key in ("model_type", "architectures", "tie_word_embeddings", "hidden_act"):
        assert config[key] == hub[key]


def test_a_synthetic_folder_may_carry_a_real_tokenizer(tmp_path, real_folder):
    """build_folder(tokenizer=...): the architecture with random weights and a published tokenizer
    (what llama.cpp's converter takes), its vocabulary sizing the embeddings, its EOS the model's."""
    from transformers import AutoTokenizer

    import backends
    from backends.folders.synthetic import build_folder
    from backends.types import GenerationConfig
    from billion.models import card_for

    card = card_for("tinyllama")
    real = AutoTokenizer.from_pretrained(real_folder)
    out = build_folder(tmp_path / "f", card.config, card.family, tiny=True, tokenizer=real)
    backend = backends.get("torch").load(out, device="cpu", dtype="float32")
    assert backend.vocab_size == len(real) and backend.eos_ids == {real.eos_token_id}
    assert backend.tokenize("hello world") == real("hello world")["input_ids"]
    assert len(backend.generate(backend.tokenize("hello"), GenerationConfig(max_tokens=3, ignore_eos=True))) == 3
