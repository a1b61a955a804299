"""Linear layers through oneDNN on x86 CPUs: torch's own CPU matmul reads weights too slowly.

Decode multiplies one row (or a batch's few rows) by every weight matrix, so its speed is the bytes
per second the matmul kernel reads. For a float32 `F.linear`, torch's x86 build calls MKL, which on
the CPU measured here gains nothing from a second thread at one row and reads less still at 8;
oneDNN's `mkldnn._linear_pointwise` (the kernel torch.compile's CPU freezing lowers linear layers
to) reads 1.3-2.8x faster from 1 to 16 rows and is still ahead at 512; and on a weight reordered
into its own blocked layout for 8 rows ("packed") a batch of 8 decodes 1.2x (SmolLM2-135M) to 1.5x
(TinyLlama-1.1B's shape) faster again, while one float32 row gains 4% (135M) or loses a quarter
(1.1B: 0.77x), and one bfloat16 row decodes 1.8x faster: `packs` says when TorchBackend packs
(`scripts/cpu_matmul_probe.py`, `scripts/cpu_linear_layouts.py`, docs/measurements.md).

`route` turns each plain float32/bfloat16 `nn.Linear` of a CPU model into a `OneDNNLinear`, the
same module with its forward changed, and (pack=True) its weight replaced, one layer at a time so
memory does not double, by oneDNN's packed copy: an opaque tensor that only this op reads. A weight
shared with another module (an output head tied to the embedding) stays as it is. `unroute` gives
the dense weights back (`to_dense` is exact) and torch's forward: everything that changes or
differentiates the weights -- quantizing, LoRA training, applying an adapter, torch.compile's
traced step -- starts there (TorchBackend and quant.quantize_model call it). Under autograd or
inside torch.compile an unpacked layer's forward is `F.linear` anyway (oneDNN's op has no backward;
inductor cannot lower it on an unpacked weight and picks its own GEMM). Results differ from MKL's by
float rounding only (the engines' parity tests hold).
"""

from __future__ import annotations

import platform

import torch
from torch import nn

KERNEL = "oneDNN linear"
DTYPES = (torch.float32, torch.bfloat16)
# The batch size oneDNN lays a packed weight out for: packed for 8 rows, a batch of 8 decodes 1.2x
# (SmolLM2-135M) to 1.5x (TinyLlama-1.1B's shape) faster than on the weight as stored
# (scripts/cpu_linear_layouts.py; docs/measurements.md).
PACK_ROWS = 8


def packs(several_rows: bool, dtype: torch.dtype) -> bool:
    """Whether packed weights are the faster layout: for a batch of several rows, and in bfloat16
    for one row too (1.8x there, where one float32 row is 0.77x as fast on TinyLlama-1.1B's shape)."""
    return several_rows or dtype == torch.bfloat16


def available() -> bool:
    # oneDNN is measured faster on x86 only; arm64 builds (Apple Silicon's CPU) keep torch's default
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


class OneDNNLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weight.is_mkldnn and (
                (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or torch.compiler.is_compiling()):
            return nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def routable(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and type(module.weight.data) is torch.Tensor
            and module.weight.dtype in DTYPES and module.weight.device.type == "cpu")


def route(model: nn.Module, pack: bool = True) -> int:
    """Route `model`'s plain CPU linear layers through oneDNN, their weights packed unless shared
    or pack=False; the number routed (0 where unavailable)."""
    if not available():
        return 0
    layers = [m for m in model.modules() if routable(m)]
    shared = _shared_weights(model)
    for layer in layers:
        layer.__class__ = OneDNNLinear
        if pack and id(layer.weight) not in shared:
            with torch.no_grad():
                layer.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), PACK_ROWS),
                                            requires_grad=False)
    return len(layers)


def unroute(model: nn.Module) -> None:
    """Give every routed layer back its dense weight and torch's own forward."""
    for m in model.modules():
        if type(m) is OneDNNLinear:
            if m.weight.is_mkldnn:
                m.weight = nn.Parameter(m.weight.to_dense())  # as transformers loaded it
            m.__class__ = nn.Linear


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters more than one module holds (a tied output head and embedding)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}
