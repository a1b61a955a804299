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
"""

from __future__ import annotations

import torch
from torch import nn

from backends.types import UserError

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
    if scheme.startswith("bnb-"):
        _bitsandbytes(model, scheme, group_size, device, dtype)
        what = ("bitsandbytes LLM.int8() (threshold 6.0)" if scheme == "bnb-int8"
                else f"bitsandbytes NF4, blocks of {group_size}")
        done, _ = _linear_count(model)
        return f"{scheme} ({what}; {done} linear layers; output head and embedding in full precision)"
    from torchao.quantization import quantize_

    config = torchao_config(scheme, group_size, device, serializable=serializable)
    untied = _untie_output_head(model)
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
    return f"{scheme} ({what}; {'; '.join(notes)})"


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


# ------------------------------------------------------------- folders on disk


def save_folder(backend, out, scheme: str, group_size: int) -> str:
    """Quantize a loaded full-precision torch backend and write an HF folder at `out`
    that transformers (and so this engine) loads back pre-quantized."""
    if scheme.startswith("bnb-"):
        raise UserError("`billion quantize` writes torchao folders (int8, int4); load bitsandbytes schemes at "
                        "run time with --quantize bnb-int8|bnb-int4")
    description = quantize_model(backend.model, scheme, group_size, backend.device, serializable=True)
    backend.quantization = description
    save_quantized(backend, out)
    return description


def folder_description(quantization_config: dict) -> str:
    """One line for a folder's `quantization_config` (torchao, bitsandbytes, ...)."""
    method = quantization_config.get("quant_method", "?")
    quant_type = quantization_config.get("quant_type")
    if isinstance(quant_type, dict):  # torchao: {"default": {"_type": "Int8WeightOnlyConfig", "_data": {...}}}
        inner = quant_type.get("default", quant_type)
        data = inner.get("_data", {})
        group = data.get("group_size") or (data.get("granularity") or {}).get("_data", {}).get("group_size")
        quant_type = inner.get("_type", "?") + (f", group {group}" if group else "")
    return f"{method} {quant_type or ''} (from folder)".replace("  ", " ")


# ------------------------------------------------------------- QLoRA


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


def save_quantized(backend, out) -> None:
    """Write a torchao-quantized loaded model the way transformers writes torchao models:
    safetensors holding the subclasses' inner tensors plus torchao metadata, and a
    TorchAoConfig as `quantization_config` in config.json."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    weights = [p for p in backend.model.parameters() if is_traceable_wrapper_subclass(p)]
    kinds = {type(p).__name__ for p in weights}
    savable = {"Int8Tensor", "IntxUnpackedToInt8Tensor", "Int4TilePackedTo4dTensor"}
    if len(kinds) != 1 or not kinds <= savable:
        raise UserError("only torchao int8 or int4 weights (not bitsandbytes, not the packed CPU int4 layout) "
                        "can be written as a folder")
    ao_config = TorchAoConfig(config_like(weights[0], backend.device))
    backend.model.config.quantization_config = ao_config
    backend.model.hf_quantizer = TorchAoHfQuantizer(ao_config)
    # A model loaded pre-quantized remembers transformers' torchao deserialisation step, which
    # save_pretrained would try (and fail) to reverse; the quantizer above writes torchao's format itself.
    backend.model._weight_conversions = [c for c in getattr(backend.model, "_weight_conversions", None) or []
                                         if _reversible(c)]
    backend.model.save_pretrained(out)
    backend.tokenizer.save_pretrained(out)


def _reversible(conversion) -> bool:
    try:
        conversion.reverse_transform()
        return True
    except NotImplementedError:
        return False
