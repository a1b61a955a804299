"""Linear layers through oneDNN on x86 CPUs: torch's own CPU matmul reads weights too slowly.

Decode multiplies one row (or a batch's few rows) by every weight matrix, so its speed is the bytes
per second the matmul kernel reads. For a float32 `F.linear`, torch's x86 build calls MKL, which on
the CPUs measured here reads 6-19 GB/s with 2 threads and does not gain from the second thread;
oneDNN's `mkldnn._linear_pointwise` (the kernel torch.compile's CPU freezing lowers linear layers
to) reads 27-32 GB/s on the same weights, and about twice MKL's at 8 rows; in bfloat16 it beats
`F.linear`'s oneDNN path too (`scripts/cpu_matmul_probe.py`, docs/measurements.md).

`route` turns each plain float32/bfloat16 `nn.Linear` of a CPU model into a `OneDNNLinear`: the
same module, the same weight tensor (no copy, no packed layout, so the state dict, peft's LoRA
wrapping and `fuse_adapter` see an ordinary Linear), only its forward changed. Under autograd the
forward is `F.linear` (oneDNN's op has no backward), so LoRA training is untouched, and so it is
inside torch.compile (inductor cannot lower the op on an unpacked weight; it picks its own GEMM). Results differ
from MKL's by float rounding only (the engines' parity tests hold). Quantized weights (torchao
tensor subclasses) keep their own kernels: `quant.quantize_model` unroutes a model before it
quantizes it.
"""

from __future__ import annotations

import platform

import torch
from torch import nn

KERNEL = "oneDNN linear"
DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    # oneDNN is measured faster on x86 only; arm64 builds (Apple Silicon's CPU) keep torch's default
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


class OneDNNLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) \
                or torch.compiler.is_compiling():
            return nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def routable(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and type(module.weight.data) is torch.Tensor
            and module.weight.dtype in DTYPES and module.weight.device.type == "cpu")


def route(model: nn.Module) -> int:
    """Route `model`'s plain CPU linear layers through oneDNN; the number routed (0 where unavailable)."""
    if not available():
        return 0
    layers = [m for m in model.modules() if routable(m)]
    for layer in layers:
        layer.__class__ = OneDNNLinear
    return len(layers)


def unroute(model: nn.Module) -> None:
    """Give every routed layer back torch's own forward (before its weight is quantized)."""
    for m in model.modules():
        if type(m) is OneDNNLinear:
            m.__class__ = nn.Linear
