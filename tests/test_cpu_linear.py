"""The torch engine's linear layers on x86 CPUs run oneDNN's kernel (backends/torch_engine/cpu_linear.py):
the same weights, the same logits to float rounding, torch's own path wherever gradients or
quantized weights are involved."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import backends
from backends.torch_engine import cpu_linear
from backends.torch_engine import quant as torch_quant
from backends.types import GenerationConfig

x86 = pytest.mark.skipif(not cpu_linear.available(), reason="oneDNN routing is for x86 CPUs with oneDNN")


def _ops(call) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return {e.key for e in prof.key_averages()}


@x86
def test_a_cpu_model_runs_its_linear_layers_through_onednn_with_the_same_logits(tiny_model):
    b = tiny_model("torch")
    linears = [m for m in b.model.modules() if isinstance(m, nn.Linear)]
    b.batch(max_batch=1)  # a batch of one reads the weights as stored
    assert linears and all(type(m) is cpu_linear.OneDNNLinear and not m.weight.is_mkldnn for m in linears)
    assert b.info().kernels == f"oneDNN linear ({len(linears)} layers)"
    b.batch(max_batch=4)  # a batch of several reads them in oneDNN's packed layout, packed in place
    assert all(m.weight.is_mkldnn for m in linears)
    assert b.info().kernels == f"oneDNN linear, packed ({len(linears)} layers)"
    assert b.info().weight_bytes == sum(p.numel() * 4 for p in b.model.parameters())
    ids = torch.tensor([[5, 17, 200, 3, 99, 41]])

    def logits():
        with torch.inference_mode():
            return b.model(input_ids=ids).logits

    assert "mkldnn::_linear_pointwise" in _ops(logits)
    routed = logits()
    cpu_linear.unroute(b.model)
    try:
        assert "mkldnn::_linear_pointwise" not in _ops(logits)
        assert torch.allclose(routed, logits(), atol=1e-5, rtol=1e-5)
        assert not any(p.is_mkldnn for p in b.model.parameters())
    finally:
        assert cpu_linear.route(b.model) == len(linears)  # packed again, as the backend left it


@x86
def test_a_head_tied_to_the_embedding_stays_dense(tiny_model):
    b = tiny_model("torch", "llama-3.2-1b")  # ties its output head to its input embedding
    b.batch(max_batch=4)
    head, embedding = b.model.get_output_embeddings(), b.model.get_input_embeddings()
    assert type(head) is cpu_linear.OneDNNLinear and head.weight is embedding.weight and not head.weight.is_mkldnn
    assert all(m.weight.is_mkldnn for m in b.model.modules() if type(m) is cpu_linear.OneDNNLinear and m is not head)


@x86
def test_bfloat16_packs_for_one_row_too(tiny_folder):
    b = backends.get("torch").load(tiny_folder(), device="cpu", dtype="bfloat16")
    b.batch(max_batch=1)
    assert all(m.weight.is_mkldnn for m in b.model.modules() if type(m) is cpu_linear.OneDNNLinear)
    assert len(b.generate([5, 17, 200], GenerationConfig(max_tokens=4, ignore_eos=True))) == 4
    b.close()


@x86
def test_training_and_compile_keep_the_weights_dense(tiny_folder):
    b = backends.get("torch").load(tiny_folder(), device="cpu", dtype="float32")
    b._keep_dense()  # what lora_train, apply_adapter and --compile call first
    b.batch(max_batch=4)
    assert not any(p.is_mkldnn for p in b.model.parameters())
    assert b.info().kernels.startswith("oneDNN linear (")
    b.close()


@x86
def test_gradients_take_torchs_own_path():  # what LoRA training runs on (TorchBackend.lora_train)
    layer = nn.Sequential(nn.Linear(16, 8))
    assert cpu_linear.route(layer, pack=False) == 1
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()  # oneDNN's op has no backward: this would raise
    assert x.grad is not None and layer[0].weight.grad is not None


@x86
def test_quantizing_gives_the_layers_back_to_torchao(tiny_folder):
    b = backends.get("torch").load(tiny_folder(), device="cpu", dtype="float32")
    assert any(type(m) is cpu_linear.OneDNNLinear for m in b.model.modules())
    torch_quant.quantize_model(b.model, "int8", 64, "cpu")  # what `billion quantize` does to a loaded model
    assert not any(type(m) is cpu_linear.OneDNNLinear for m in b.model.modules())
    assert len(b.generate([5, 17, 200], GenerationConfig(max_tokens=4, ignore_eos=True))) == 4
    b.close()


def test_other_cpus_keep_torchs_default(monkeypatch):
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "arm64")
    layer = nn.Sequential(nn.Linear(16, 8))
    assert cpu_linear.route(layer) == 0 and type(layer[0]) is nn.Linear
