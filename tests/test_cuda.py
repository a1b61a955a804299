"""The torch engine on a CUDA GPU: what CPU runs cannot show.

Skipped without CUDA (this machine and CI have none); scripts/device_check.sh runs these on a GPU
machine, and its log says what passed there.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU here: scripts/device_check.sh runs these on one")

from backends.types import GenerationConfig  # noqa: E402

GREEDY = GenerationConfig(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPT = list(range(11, 43))


def load(folder, **kw):
    import backends

    return backends.get("torch").load(folder, device="cuda", **kw)


def test_cuda_float32_logits_match_cpu(tiny_folder, tiny_model):
    gpu = load(tiny_folder("tinyllama"), dtype="float32")
    diff = np.abs(gpu.logits(PROMPT) - tiny_model("torch").logits(PROMPT)).max()
    assert diff < 1e-3, diff
    stats = gpu.memory()
    assert stats.source == "torch.cuda.max_memory_allocated" and stats.peak > 0
    assert gpu.info().device.startswith("cuda")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_cuda_graph_decode_gives_eager_tokens(tiny_folder, dtype):
    # inductor with CUDA graphs ("reduce-overhead"): replayed graphs, static cache written in place
    eager = load(tiny_folder("tinyllama"), dtype=dtype)
    compiled = load(tiny_folder("tinyllama"), dtype=dtype, compile=True)
    want = eager.generate(PROMPT, GREEDY)
    assert compiled.generate(PROMPT, GREEDY) == want
    assert compiled.generate(PROMPT, GREEDY) == want  # a replay, not only the first (compiling) call
    assert "CUDA graphs" in compiled.info().compiled


@pytest.mark.parametrize("scheme", ["int8", "int4", "bnb-int8", "bnb-int4"])
def test_quantized_cuda_generates_close_to_full_precision(tiny_folder, scheme):
    if scheme.startswith("bnb-"):
        pytest.importorskip("bitsandbytes")
    full = load(tiny_folder("tinyllama"), dtype="bfloat16")
    q = load(tiny_folder("tinyllama"), dtype="bfloat16", quantize=scheme)
    assert len(q.generate(PROMPT, GREEDY)) == GREEDY.max_tokens
    a, b = full.logits(PROMPT), q.logits(PROMPT)
    assert np.isfinite(b).all()
    if "int8" in scheme:  # 4 bits move a random tiny model's flat logits too far for a top-1 bound
        top1 = float(np.mean(a.argmax(-1) == b.argmax(-1)))
        assert top1 > 0.8, (scheme, top1)
    assert q.info().weight_bytes < full.info().weight_bytes
