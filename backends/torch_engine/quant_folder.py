"""torch quantized model folders: written as transformers writes torchao models, read back as they are."""

from __future__ import annotations

from backends.torch_engine.quant import config_like, quantize_model
from backends.types import UserError


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
