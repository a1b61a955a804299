"""PyTorch engine: transformers models on CUDA, MPS or CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from backends import host
from backends.folders import hf_folder
from backends.torch_engine import cpu_linear
from backends.torch_engine import quant as torch_quant
from backends.torch_engine import quant_adapters, quant_folder
from backends.base import Backend
from backends.sessions import KVSession
from backends.types import MemoryStats, ModelInfo, UserError

# transformers draws a "Loading weights" bar per load; billion shows its own status line.
transformers.utils.logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> str:
    # bf16 on CUDA (what the weights are published in), fp16 on MPS (fast
    # there), fp32 on CPU (exact; the one dtype both engines agree on).
    return {"cuda": "bfloat16", "mps": "float16"}.get(device.split(":")[0], "float32")


def check_device(device: str) -> None:
    kind = device.split(":")[0]
    ok = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in ok:
        raise UserError(f"unknown torch device {device!r}; choose cuda, mps or cpu")
    if not ok[kind]:
        found = [k for k, v in ok.items() if v]
        raise UserError(f"torch device {kind!r} is not available here; available: {', '.join(found)}")


class TorchSession(KVSession):
    def __init__(self, backend: "TorchBackend"):
        self.backend = backend
        self.cache = DynamicCache(config=backend.model.config)
        self.length = 0

    @torch.inference_mode()
    def feed(self, ids: Sequence[int], keep: int = 0) -> np.ndarray:
        inp = torch.tensor([list(ids)], device=self.backend.device)
        out = self.backend.model(input_ids=inp, cache=self.cache, use_cache=True, logits_to_keep=keep)
        self.length += len(ids)
        return out.logits[0].float().cpu().numpy()

    def crop(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # transformers 5: a negative count removes tokens
            self.length = length


class TorchBackend(Backend):
    name = "torch"
    compiles = True
    kernels: str | None = None  # the CPU matmul path where it is not torch's default (cpu_linear)
    _packed: bool | None = None  # whether the routed layers' weights are packed (None: not routed yet)
    _dense_only = False  # training, an adapter or --compile holds the weights as they are

    @classmethod
    def _load(cls, path: Path, *, device=None, dtype=None, trust_remote_code=False,
              quantize=None, group_size=64) -> "TorchBackend":
        device = device or default_device()
        check_device(device)
        dtype = dtype or default_dtype(device)
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        hf_folder.check_remote_code(path, hf_folder.read_config(path), trust_remote_code)
        hf_folder.tensor_shapes(path)  # missing or unreadable weights: one line naming the file, first
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError) as e:
            arch = hf_folder.read_config(path).get("architectures") or ["?"]
            raise UserError(f"the torch engine (transformers {transformers.__version__}) cannot load "
                            f"architecture {arch[0]}: {str(e).splitlines()[0]}") from None
        tokenizer = hf_folder.load_tokenizer(path, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
            use_safetensors=True)
        model.to(device).eval()
        quantization = None
        folder_q = getattr(config, "quantization_config", None)
        if folder_q:  # a folder written pre-quantized (billion quantize): its weights load as stored
            quantization = quant_folder.folder_description(folder_q if isinstance(folder_q, dict) else folder_q.to_dict())
        if quantize:
            quantization = torch_quant.quantize_model(model, quantize, group_size, device)
        backend = cls(model, tokenizer, Path(path), model.config.to_dict(), device, dtype, quantization)
        backend._route(pack=cpu_linear.packs(False, model.dtype))
        return backend

    def _route(self, pack: bool) -> None:
        """On a CPU, run the linear layers on oneDNN (cpu_linear), their weights in oneDNN's packed
        layout where that is faster (`cpu_linear.packs`: a batch of several rows; one row in
        bfloat16), as stored otherwise. The layout follows the scheduler last made (batch_cache,
        one_row_cache); once training, an adapter or --compile wants the weights as they are
        (`_keep_dense`), they stay unpacked."""
        if self.device != "cpu":
            return
        pack = pack and not self._dense_only
        if self._packed == pack:
            return
        cpu_linear.unroute(self.model)
        routed = cpu_linear.route(self.model, pack=pack)
        self._packed = pack
        self.kernels = f"{cpu_linear.KERNEL}{', packed' if pack else ''} ({routed} layers)" if routed else None

    def _keep_dense(self) -> None:
        self._dense_only = True
        self._route(pack=False)

    def _compile_decode(self) -> None:
        from backends.torch_engine.compiled import CompiledDecode

        self._keep_dense()
        self.compiled = CompiledDecode(self.model, self.device, self.context_length)

    def session(self) -> TorchSession:
        return TorchSession(self)

    def batch_cache(self):
        from backends.torch_engine.batch import TorchBatchCache

        self._route(pack=cpu_linear.packs(True, self.model.dtype))
        return TorchBatchCache(self)

    def one_row_cache(self):
        self._route(pack=cpu_linear.packs(False, self.model.dtype))
        if self.compiled is None:
            return super().one_row_cache()
        from backends.torch_engine.compiled import CompiledBatchCache

        return CompiledBatchCache(self)

    @torch.inference_mode()
    def batch_logits(self, rows, positions) -> list[np.ndarray]:
        # One right-padded forward pass, no cache (see Backend.batch_logits); a 2-D
        # logits_to_keep projects only the asked-for positions to the vocabulary
        # (each row's list padded to the same length by repeating its last position).
        width, count = max(len(r) for r in rows), max(len(p) for p in positions)
        ids = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        keep = torch.tensor([list(p) + [p[-1]] * (count - len(p)) for p in positions], device=self.device)
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        return [logits[i, : len(p)].float().cpu().numpy() for i, p in enumerate(positions)]

    def memory(self) -> MemoryStats:
        if self.device.startswith("cuda"):
            return MemoryStats(torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated(),
                               "torch.cuda.max_memory_allocated")
        if self.device == "mps":
            # MPS keeps no peak counter: report what the driver holds now.
            return MemoryStats(torch.mps.current_allocated_memory(), torch.mps.driver_allocated_memory(),
                               "torch.mps.driver_allocated_memory (current, no peak counter)")
        return MemoryStats(host.current_rss_bytes(), host.peak_rss_bytes(), "process peak RSS")

    def reset_peak_memory(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        elif self.device == "cpu":
            host.reset_peak_rss()

    def info(self) -> ModelInfo:
        # quantized weights (torchao subclasses, bitsandbytes) are counted as stored, not as they stand for
        weight_bytes = sum(torch_quant.stored_bytes(p) for p in self.model.parameters())
        params = sum(torch_quant.logical_numel(p) for p in self.model.parameters())
        embed = self.model.get_input_embeddings().weight
        tied = self.model.get_output_embeddings().weight is embed
        embed_bytes = 0 if tied else torch_quant.stored_bytes(embed)
        config = self.model.config
        return ModelInfo(
            backend=self.name, path=str(self.path), architecture=(config.architectures or ["?"])[0],
            model_type=config.model_type, parameters=params, dtype=self.dtype, device=self.device,
            weight_bytes=weight_bytes, decode_bytes_per_token=weight_bytes - embed_bytes,
            vocab_size=self.vocab_size, context_length=self.context_length, quantization=self.quantization,
            source=self.source, compiled=self.compiled.describe() if self.compiled else None,
            kernels=self.kernels,
            versions={"torch": torch.__version__, "transformers": transformers.__version__})

    def memory_bandwidth(self) -> tuple[float | None, str]:
        if not self.device.startswith("cuda"):
            return super().memory_bandwidth()
        # device-to-device copy of 1 GiB reads and writes it once each
        x = torch.empty(2**28, dtype=torch.float32, device=self.device)
        y = torch.empty_like(x)
        best = 0.0
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y.copy_(x)
            end.record()
            torch.cuda.synchronize()
            best = max(best, 2 * x.nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
        del x, y
        return best, f"measured device copy bandwidth on {torch.cuda.get_device_name()}"

    # the optional operations: the quant modules' functions take the backend first; trl and peft
    # take seconds to import, so backends/torch_engine/train.py is imported only to train.
    save_quantized_folder = quant_folder.save_folder
    adapter_logits = quant_adapters.adapter_logits
    fuse_adapter = quant_adapters.fuse_adapter
    save_quantized = quant_folder.save_quantized

    def lora_train(self, train, val, config, out_dir, on_step=None, resume=False):
        from backends.torch_engine import train as torch_train

        self._keep_dense()
        return torch_train.train(self, train, val, config, out_dir, on_step=on_step, resume=resume)

    def apply_adapter(self, adapter_dir: Path) -> None:
        from backends.torch_engine import train as torch_train

        self._keep_dense()
        torch_train.apply_adapter(self, adapter_dir)

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
