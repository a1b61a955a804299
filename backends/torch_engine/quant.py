"""torch weight-only quantization: torchao on CPU and CUDA, bitsandbytes on CUDA.

Schemes (`--quantize`):
  int8      torchao Int8WeightOnlyConfig: one int8 per weight, one scale per output
            channel (torchao's int8 weight-only has no groups: --group-size does not apply).
  int4      CUDA: torchao Int4WeightOnlyConfig, tinygemm kernel (bfloat16, compute
            capability >= 8.0), two weights per byte, a scale and zero per group.
            CPU: torchao's CPU int4 layout (two weights per byte, ATen's
            `_weight_int4pack_mm_for_cpu` kernel), a scale and zero per group.
  bnb-int8  bitsandbytes LLM.int8() (CUDA only).
  bnb-int4  bitsandbytes NF4, blocks of --group-size (CUDA only).

Every nn.Linear is quantized, the output head included (bitsandbytes: all but the
head, as transformers does); the input embedding stays in full precision: a
lookup reads one row per token, and torchao's int8 embedding dequantizes the
whole table on every lookup. A scheme the device has no kernel for is a
UserError naming what works there — never a silent fallback to full precision.

Here: schemes, quantizing a loaded model, and honest byte counts. Folders on disk are in
quant_folder.py; LoRA on a quantized base (QLoRA, fusing) in quant_adapters.py.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from backends.torch_engine import cpu_linear
from backends.types import UserError

log = logging.getLogger("billion")

SCHEMES = ("int8", "int4", "bnb-int8", "bnb-int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # torchao int4 kernels


def _device_kind(device: str) -> str:
    return str(device).split(":")[0]


def check_scheme(scheme: str, group_size: int, device: str, dtype: torch.dtype) -> None:
    """Refuse, before touching the model, a scheme this device or dtype cannot run."""
    kind = _device_kind(device)
    if scheme not in SCHEMES:
        raise UserError(f"unknown torch quantization {scheme!r}; choose from {', '.join(SCHEMES)}")
    if kind == "mps":
        raise UserError("the torch engine has no int8/int4 weight kernels on MPS (torchao runs on CPU and CUDA, "
                        "bitsandbytes on CUDA); on Apple Silicon use --backend mlx --quantize int8|int4, "
                        "or --device cpu")
    if scheme.startswith("bnb-"):
        if kind != "cuda":
            raise UserError(f"{scheme} (bitsandbytes) needs a CUDA GPU; on {kind} use --quantize int8 or int4 "
                            f"(torchao)")
        if group_size < 64:
            raise UserError(f"bitsandbytes blocks are 64 weights or more, not {group_size}")
        return
    if scheme == "int4":
        if group_size not in INT4_GROUP_SIZES:
            raise UserError(f"torchao int4 takes a group size of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                            f"not {group_size}")
        if kind == "cuda":
            if dtype != torch.bfloat16:
                raise UserError("torchao int4 on CUDA (tinygemm) runs in bfloat16: add --dtype bfloat16, "
                                "or use --quantize int8 or bnb-int4")
            if torch.cuda.get_device_capability(device)[0] < 8:
                raise UserError("torchao int4 on CUDA needs compute capability 8.0 or newer; "
                                "use --quantize bnb-int4 or int8")


def _torchao():
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise UserError("torch int8/int4 quantization needs torchao: pip install torchao") from None
    import torchao.quantization as q

    return q


def torchao_config(scheme: str, group_size: int, device: str, *, serializable: bool = False):
    """The torchao config for a scheme on a device.

    serializable: for folders written to disk, int4 on CPU uses torchao's
    unpacked format (int4 values held one per byte), the only int4 layout with a
    CPU kernel that torchao's safetensors support can save.
    """
    q = _torchao()
    if scheme == "int8":
        return q.Int8WeightOnlyConfig()
    if _device_kind(device) == "cuda":
        return q.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    if serializable:
        return q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerGroup(group_size))
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group_size)


def config_like(weight, device: str):
    """The torchao config that quantizes a weight into the same format as `weight`
    (a torchao tensor): how a fused layer is re-quantized, and what a folder records."""
    kind, group = type(weight).__name__, int(weight.block_size[-1])
    if kind == "Int8Tensor":
        return torchao_config("int8", group, device)
    return torchao_config("int4", group, device, serializable=kind == "IntxUnpackedToInt8Tensor")


def _untie_output_head(model) -> bool:
    """Quantizing a head tied to the embedding replaces the head's weight; record the
    untying in the config so a saved folder keeps both."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return False
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


def _linear_count(model) -> tuple[int, int]:
    """(quantized linears, linears still in full precision); bitsandbytes layers
    subclass nn.Linear and hold integer data, torchao weights are subclasses."""
    done = kept = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if type(m.weight.data) is torch.Tensor and m.weight.dtype.is_floating_point:
                kept += 1
            else:
                done += 1
    return done, kept


def quantize_model(model, scheme: str, group_size: int, device: str, *, serializable: bool = False) -> str:
    """Quantize `model` (already on `device`) in place; return what was done."""
    dtype = next(model.parameters()).dtype
    check_scheme(scheme, group_size, device, dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        raise UserError("this model folder is already quantized (its config.json has a quantization_config); "
                        "load it without --quantize")
    cpu_linear.unroute(model)  # a quantized weight keeps its own kernel (`billion quantize` quantizes a loaded model)
    if scheme.startswith("bnb-"):
        _bitsandbytes(model, scheme, group_size, device, dtype)
        what = ("bitsandbytes LLM.int8() (threshold 6.0)" if scheme == "bnb-int8"
                else f"bitsandbytes NF4, blocks of {group_size}")
        done, _ = _linear_count(model)
        return f"{scheme} ({what}; {done} linear layers; output head and embedding in full precision)"
    from torchao.quantization import quantize_

    config = torchao_config(scheme, group_size, device, serializable=serializable)
    untied = _untie_output_head(model)
    probe = _speed_probe(model) if _device_kind(device) == "cpu" else None
    quantize_(model, config)
    done, kept = _linear_count(model)
    if scheme == "int8":
        what = "torchao int8 weight-only, one scale per output channel"
    elif _device_kind(device) == "cuda":
        what = f"torchao int4 weight-only (tinygemm), group {group_size}, two weights per byte"
    elif serializable:
        what = f"torchao int4 weight-only, group {group_size}, stored one int4 value per byte (int8) on CPU"
    else:
        what = f"torchao int4 weight-only (CPU int4pack kernel), group {group_size}, two weights per byte"
    notes = [f"{done} linear layers"]
    if kept:
        notes.append(f"{kept} left in full precision (width not divisible by {group_size})")
    if untied:
        notes.append("output head quantized as its own copy of the tied embedding")
    notes.append("input embedding in full precision")
    if probe:
        notes.append(_speed_note(scheme, dtype, *probe))
    return f"{scheme} ({what}; {'; '.join(notes)})"


# ------------------------------------------------------------- is it faster here?


def _speed_probe(model) -> tuple[str, nn.Linear, nn.Linear] | None:
    """(name, the model's widest linear layer, a full-precision copy of it), taken before quantizing."""
    head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if not linears:
        return None
    name, layer = max(linears, key=lambda nm: nm[1].weight.numel())
    return name, layer, copy.deepcopy(layer)


def _best_us(layer: nn.Linear, repeats: int = 20) -> float:
    x = torch.randn(1, 1, layer.in_features, dtype=layer.weight.dtype if layer.weight.is_floating_point()
                    else torch.float32)
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 3):
            start = time.perf_counter()
            layer(x)
            if i >= 3:  # the first calls pay for kernel set-up
                best = min(best, time.perf_counter() - start)
    return best * 1e6


def _speed_note(scheme: str, dtype: torch.dtype, name: str, quantized: nn.Linear, original: nn.Linear) -> str:
    """On CPU, whether the quantized kernel is faster than full precision is a property of the CPU
    and the kernel, not a given (torchao's int8 and int4 CPU kernels are slower than float32 on the
    2-core EPYC this was written on): measure one decode-shaped matmul (one token) of the widest
    layer both ways, and warn when quantizing costs speed."""
    q_us, f_us = _best_us(quantized), _best_us(original)
    full = str(dtype).removeprefix("torch.")
    factor = q_us / f_us
    if factor > 1.0:
        log.warning(f"--quantize {scheme} on this CPU saves memory but costs speed: one token's matmul through "
                    f"{name} took {factor:.1f}x as long as in {full} (measured at load: {q_us:.0f} vs "
                    f"{f_us:.0f} us); load in {full} for speed")
    return f"one-token matmul {factor:.2f}x the time of {full} on this CPU (measured at load on {name})"


def _bitsandbytes(model, scheme: str, group_size: int, device: str, dtype: torch.dtype) -> None:
    """Swap every nn.Linear but the output head for its bitsandbytes twin; moving a
    bitsandbytes parameter to the GPU is what quantizes it."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("bnb-int8/bnb-int4 need bitsandbytes: pip install bitsandbytes") from None
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            weight = child.weight.data.to("cpu")
            if scheme == "bnb-int8":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=dtype, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=group_size)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.to("cpu"), requires_grad=False)
            setattr(parent, name, new.to(device))


# ------------------------------------------------------------- honest byte counts


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly quantized) weight really holds in memory.

    torchao weights are tensor subclasses whose numel()/element_size() describe
    the full-precision tensor they stand for; what they store is their inner
    tensors (packed data, scales, zero points). bitsandbytes parameters hold the
    packed data themselves plus their scales aside.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: per-block absmax
    if state is not None and getattr(state, "absmax", None) is not None:
        total += state.absmax.numel() * state.absmax.element_size()
    scb = getattr(t, "SCB", None)  # bitsandbytes 8-bit: per-row scales
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    return total


def logical_numel(t: torch.Tensor) -> int:
    """How many weights a (possibly packed) parameter stands for."""
    state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit packs two weights per byte
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return t.numel()
