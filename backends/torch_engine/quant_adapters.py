"""LoRA on quantized torch weights: making a quantized base trainable (QLoRA) and fusing an
adapter back into it (dequantize, add B @ A, re-quantize in the layer's own format)."""

from __future__ import annotations

import torch
from torch import nn

from backends.torch_engine.quant import config_like
from backends.types import UserError


# torchao int4 layouts whose matmul kernels have no derivative: no gradient reaches the LoRA layers below them.
_NO_BACKWARD = ("Int4OpaqueTensor", "Int4TilePackedTo4dTensor", "Int4Tensor")


def prepare_for_training(model) -> str:
    """Make a quantized base trainable under LoRA (QLoRA); say what changed.

    The base weights stay frozen and quantized, but gradients must flow through
    them to the adapters: torchao int8 has a backward pass, its int4 kernels do
    not (refused here with what works instead); bitsandbytes is peft's own
    QLoRA path. The output head goes back to full precision, because trl's
    fused loss slices and transposes the head's weight directly.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    kinds = {type(p).__name__ for p in model.parameters() if is_traceable_wrapper_subclass(p)}
    if kinds & set(_NO_BACKWARD):
        raise UserError("LoRA on a torch int4 base needs bitsandbytes on CUDA (--quantize bnb-int4): torchao's int4 "
                        "kernels have no backward pass; on CPU use --quantize int8, or the MLX engine's int4")
    head = model.get_output_embeddings()
    if head is not None and is_traceable_wrapper_subclass(head.weight):
        head.weight = nn.Parameter(head.weight.dequantize(), requires_grad=False)
        return "output head dequantized for training"
    return ""


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapter_logits(backend, ids: list[int]) -> tuple:
    """(base alone, base + adapter) logits of a model carrying peft LoRA layers."""
    layers = [m for _, m in _lora_layers(backend.model)]
    if not layers:
        raise UserError("the model carries no LoRA adapter to fuse")
    adapted = backend.logits(ids)
    for m in layers:
        m.enable_adapters(False)
    try:
        base = backend.logits(ids)
    finally:
        for m in layers:
            m.enable_adapters(True)
    return base, adapted


@torch.no_grad()
def fuse_adapter(backend, requantize: bool = True) -> str:
    """Fuse the peft LoRA layers into their quantized base layers, in place, and
    drop the LoRA wrappers: torchao weights are dequantized, given W + B @ A *
    scaling and re-quantized in their own format (requantize=False: left in full
    precision); bitsandbytes layers use peft's own merge (which re-quantizes)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    from torchao.quantization import quantize_

    count = 0
    for name, m in _lora_layers(backend.model):
        base = m.get_base_layer()
        if is_traceable_wrapper_subclass(base.weight):
            config = config_like(base.weight, backend.device)
            weight = base.weight.dequantize() + m.get_delta_weight("default").to(base.weight.dtype)
            base.weight = nn.Parameter(weight, requires_grad=False)
            if requantize:
                quantize_(base, config, filter_fn=lambda mod, fqn: mod is base)
        else:  # bitsandbytes, or a layer left in full precision
            m.merge()
        parent, _, child = name.rpartition(".")
        setattr(backend.model.get_submodule(parent) if parent else backend.model, child, base)
        count += 1
    if hasattr(backend.model, "peft_config"):
        del backend.model.peft_config
    return f"{count} layers dequantized, fused" + (" and re-quantized" if requantize else ", kept in full precision")
