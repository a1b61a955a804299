"""MLX engine: mlx-lm models on Metal (Apple Silicon) or the CPU."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.utils import _get_classes, get_total_parameters, load_model

from backends.folders import hf_folder
from backends.mlx_engine import quant as mlx_quant
from backends.mlx_engine.batch import MLXBatchCache, MLXOneRowCache, forward, to_numpy
from backends.mlx_engine import train as mlx_train
from backends.base import Backend
from backends.sessions import KVSession
from backends.types import MemoryStats, ModelInfo, UserError

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_device() -> str:
    return "gpu" if mx.metal.is_available() else "cpu"


def default_dtype(device: str) -> str:
    # The GPU runs what the weights are published in (bf16 for all four models);
    # the CPU runs float32 (exact, and what the torch engine uses there too).
    return "bfloat16" if device == "gpu" else "float32"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class MLXSession(KVSession):
    def __init__(self, backend: "MLXBackend"):
        self.model = backend.model
        self.cache = make_prompt_cache(backend.model)
        self.length = 0

    def feed(self, ids: Sequence[int], keep: int = 0) -> np.ndarray:
        logits = forward(self.model, self.cache, ids, keep)
        self.length += len(ids)
        return to_numpy(logits)

    def crop(self, length: int) -> None:
        if length < self.length:
            trim_prompt_cache(self.cache, self.length - length)
            self.length = length


class MLXBackend(Backend):
    name = "mlx"

    @classmethod
    def _load(cls, path: Path, *, device=None, dtype=None, trust_remote_code=False,
              quantize=None, group_size=64) -> "MLXBackend":
        device = device or default_device()
        if device not in ("gpu", "cpu"):
            raise UserError(f"unknown MLX device {device!r}; choose gpu or cpu")
        if device == "gpu" and not mx.metal.is_available():
            raise UserError("MLX has no GPU here (Metal is only on Apple Silicon); use --device cpu")
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        dtype = dtype or default_dtype(device)
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        path = Path(path)
        config = hf_folder.read_config(path)
        try:
            _get_classes(config)
        except ValueError as e:
            raise UserError(f"the MLX engine (mlx-lm {_version('mlx-lm')}) cannot load architecture "
                            f"{(config.get('architectures') or ['?'])[0]} ({e})") from None
        hf_folder.check_remote_code(path, config, trust_remote_code)
        hf_folder.tensor_shapes(path)  # missing or unreadable weights: one line naming the file, before mlx-lm
        model, config = load_model(path, lazy=True, trust_remote_code=trust_remote_code)
        quantization = None
        if "quantization" in config:  # an mlx-lm quantized folder: keep its packed weights
            q = config["quantization"]
            quantization = f"int{q['bits']} (group {q['group_size']}, from folder)"
        # set_dtype casts floating parameters only: packed quantized weights stay as they are.
        model.set_dtype(DTYPES[dtype])
        if quantize:
            quantization = mlx_quant.quantize_model(model, quantize, group_size)
        mx.eval(model.parameters())
        if device == "gpu":
            # what mlx_lm's wired_limit does around each of its generations, once for the model's
            # life: Metal keeps the weights resident (wired) instead of paging them between steps
            size = mx.metal.device_info().get("max_recommended_working_set_size")
            if size:
                mx.set_wired_limit(size)
        tokenizer = hf_folder.load_tokenizer(path, trust_remote_code)
        return cls(model, tokenizer, path, config, device, dtype, quantization)

    def session(self) -> MLXSession:
        return MLXSession(self)

    def batch_cache(self):
        return MLXBatchCache(self)

    def one_row_cache(self):
        return MLXOneRowCache(self)

    def batch_logits(self, rows, positions) -> list[np.ndarray]:
        # One right-padded forward pass, no cache (see Backend.batch_logits). mlx-lm
        # projects every position to the vocabulary; only the asked-for rows are copied out.
        width = max(len(r) for r in rows)
        padded = mx.array([list(r) + [0] * (width - len(r)) for r in rows])
        logits = self.model(padded)
        out = [logits[i, mx.array(list(pos))].astype(mx.float32) for i, pos in enumerate(positions)]
        mx.eval(out)
        return [np.array(x) for x in out]

    def memory(self) -> MemoryStats:
        return MemoryStats(mx.get_active_memory(), mx.get_peak_memory(), "mx.get_peak_memory")

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def info(self) -> ModelInfo:
        leaves = tree_flatten(self.model.parameters())
        weight_bytes = sum(v.nbytes for _, v in leaves)
        embed_bytes = 0
        if not self.config.get("tie_word_embeddings", False):
            embed = next((m for _, m in self.model.named_modules()
                          if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))), None)
            if embed is not None:
                embed_bytes = sum(v.nbytes for _, v in tree_flatten(embed.parameters()))
        return ModelInfo(
            backend=self.name, path=str(self.path),
            architecture=(self.config.get("architectures") or ["?"])[0],
            model_type=self.config.get("model_type", "?"),
            parameters=get_total_parameters(self.model),
            dtype=self.dtype, device=self.device, weight_bytes=weight_bytes,
            decode_bytes_per_token=weight_bytes - embed_bytes, vocab_size=self.vocab_size,
            context_length=self.context_length, quantization=self.quantization, source=self.source,
            versions={"mlx": _version("mlx"), "mlx-lm": _version("mlx-lm")})

    # the optional operations: the train and quant modules' functions take the backend first
    lora_train = mlx_train.train
    apply_adapter = mlx_train.apply_adapter
    save_quantized_folder = mlx_quant.save_folder
    adapter_logits = mlx_quant.adapter_logits
    fuse_adapter = mlx_quant.fuse_adapter
    save_quantized = mlx_quant.save_quantized

    def close(self) -> None:
        self.model = None
        mx.clear_cache()
