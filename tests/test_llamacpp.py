"""The llama.cpp peer engine on the real model (SmolLM2-135M).

llama-cpp-python has no wheel here and takes ~10 minutes to build (scripts/setup_llamacpp.sh), so
CI's default path does not install it and these tests are skipped there, saying so; the first
test below, which needs no llama.cpp, runs everywhere. llama.cpp's converter refuses the
synthetic folders' home-made tokenizer, hence the real model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import backends
from backends.types import GenerationConfig, UserError
from tests.conftest import USER_CACHE


def test_missing_peer_names_its_setup(monkeypatch):
    monkeypatch.setattr(backends, "_probe", lambda name: "ImportError: no llama_cpp" if name == "llama.cpp" else None)
    with pytest.raises(UserError, match="scripts/setup_llamacpp.sh"):
        backends.get("llama.cpp")
    assert "llama.cpp" not in backends.engine_names("all")


@pytest.fixture(scope="module")
def peer(real_folder):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (bash scripts/setup_llamacpp.sh)")
    import llama_cpp

    tools = Path(USER_CACHE) / f"llama.cpp-{llama_cpp.__version__}"
    if not (tools / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converter is not in {tools} (bash scripts/setup_llamacpp.sh)")
    loaded = {}

    def get(dtype="float32", quantize=None):
        if (dtype, quantize) not in loaded:
            loaded[dtype, quantize] = backends.get("llama.cpp").load(real_folder, dtype=dtype, quantize=quantize)
        return loaded[dtype, quantize]

    with pytest.MonkeyPatch.context() as env:  # the tests' private BILLION_HOME has no converter
        env.setenv("BILLION_LLAMA_CPP", str(tools))
        yield get
    for b in loaded.values():
        b.close()


def test_same_answer_as_torch(peer, real_model):
    prompt = "What is the capital of France? Answer briefly."
    gen = GenerationConfig(max_tokens=12, temperature=0.0)
    replies = []
    for b in (peer(), real_model("torch")):
        ids = b.apply_chat_template([{"role": "user", "content": prompt}])
        replies.append("".join(c.text for c in b.stream(ids, gen)))
    assert "Paris" in replies[0] and replies[0] == replies[1]


def test_float32_logits_match_torch(peer, real_model):
    b, t = peer(), real_model("torch")
    ids = t.tokenize("The history of the city begins with a small settlement on the river, where")
    a, c = b.logits(ids), t.logits(ids)
    assert a.shape == c.shape
    assert (a.argmax(-1) == c.argmax(-1)).all()
    # llama.cpp keeps its KV cache in float16 (its default): close, not equal
    assert np.abs(a - c).max() < 0.2


def test_session_crop_and_turns(peer):
    """Feeding after a crop equals feeding fresh; two sessions taking turns in llama.cpp's one
    context each keep their own tokens."""
    b = peer()
    ids = list(range(100, 140))
    fresh = b.session().feed(ids)
    s = b.session()
    s.feed(ids[:30])
    s.crop(20)
    again = s.feed(ids[20:])
    np.testing.assert_allclose(again, fresh[20:], atol=1e-4)
    other = b.session()
    other.feed(list(range(500, 520)))
    # s feeds again after `other` used the context: it must see its own 40 tokens, not other's 20.
    # llama.cpp's one-token and many-token kernels round differently (~1e-2 here); a session on
    # the wrong tokens would be off by whole logits.
    mine, reference = s.feed([7], keep=1)[-1], b.session().feed(ids + [7], keep=1)[-1]
    assert mine.argmax() == reference.argmax() and np.abs(mine - reference).max() < 0.1


def test_quantized_and_refused(peer):
    q = peer(quantize="int8")
    assert "Q8_0" in q.info().quantization and q.info().weight_bytes < peer().info().weight_bytes / 3
    with pytest.raises(UserError, match="Q8_0"):
        peer(quantize="bnb-int4")
    with pytest.raises(UserError, match="context"):
        q.check_fits(q.context_length, 1)


def test_synthetic_folder_is_refused_with_the_reason(peer, tiny_folder):
    with pytest.raises(UserError, match="home-made one"):
        backends.get("llama.cpp").load(tiny_folder())
