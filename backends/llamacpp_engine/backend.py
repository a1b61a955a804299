"""llama.cpp as a peer engine (llama-cpp-python): the same folder, converted to GGUF, behind the
same contract, so that bench, parity, perplexity and evaluation compare billion's engines with
the tool a Linux or GGUF user would pick instead.

Inference only (no LoRA, no quantized folders). Tokens go in and out as ids through the folder's
own transformers tokenizer, as on the other engines: llama.cpp's tokenizer is never used, so all
three engines see the same ids. Decoding is the one scheduler's batch of one on a KV session
(backends/batching.py, sessions.SessionBatchCache; numpy sampling) over llama.cpp's context, one
llama_decode per token; prefill asks llama.cpp for the last position's logits only, as the other
engines' prefill does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np

from backends import host
from backends.base import Backend
from backends.sessions import KVSession
from backends.folders import hf_folder
from backends.llamacpp_engine import convert
from backends.types import MemoryStats, ModelInfo, UserError

# llama.cpp allocates its KV cache for the whole context up front: a 128k-token context would
# take gigabytes, so the context is capped (prompts longer than this are refused, as everywhere).
MAX_CONTEXT = 8192
BATCH = 512


def threads() -> int:
    """OMP_NUM_THREADS when set (what torch follows too), else every core this process may use."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return host.usable_cores()


def gguf_tensors(path: Path) -> tuple[dict[str, int], list[str]]:
    """({tensor name: bytes stored}, the tensor types) of a GGUF file, read from its header."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: int(t.n_bytes) for t in reader.tensors}, sorted({t.tensor_type.name for t in reader.tensors})


class LlamaCppSession(KVSession):
    """One sequence in the model's single llama.cpp context. Sessions take turns: a session that
    feeds after another one did first clears the context and feeds its own tokens again."""

    def __init__(self, backend: "LlamaCppBackend"):
        self.backend = backend
        self.ids: list[int] = []

    def feed(self, ids: Sequence[int], keep: int = 0) -> np.ndarray:
        b = self.backend
        if b.owner is not self:
            b.clear()
            b.owner = self
            if self.ids:
                b.decode(self.ids, 0, want=[])
        ids = list(ids)
        if len(self.ids) + len(ids) > b.context_length:
            raise UserError(f"{len(self.ids) + len(ids)} tokens do not fit llama.cpp's context of "
                            f"{b.context_length} tokens")
        want = range(len(ids)) if keep == 0 else range(max(0, len(ids) - keep), len(ids))
        logits = b.decode(ids, len(self.ids), want=list(want))
        self.ids.extend(ids)
        return logits

    def crop(self, length: int) -> None:
        if length < len(self.ids):
            if self.backend.owner is self:
                self.backend.remove_from(length)
            del self.ids[length:]


class LlamaCppBackend(Backend):
    name = "llama.cpp"

    @classmethod
    def _load(cls, path: Path, *, device=None, dtype=None, trust_remote_code=False,
              quantize=None, group_size=64) -> "LlamaCppBackend":
        gpu = llama_cpp.llama_supports_gpu_offload()
        device = device or ("gpu" if gpu else "cpu")
        if device not in ("cpu", "gpu"):
            raise UserError(f"unknown llama.cpp device {device!r}; choose cpu or gpu")
        if device == "gpu" and not gpu:
            raise UserError("this llama-cpp-python was built without GPU support; use --device cpu")
        dtype = dtype or "float32"
        if dtype not in convert.FLOAT_TYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(convert.FLOAT_TYPES)}")
        if quantize and quantize not in convert.QUANT_TYPES:
            raise UserError(f"the llama.cpp engine quantizes to {', '.join(convert.QUANT_TYPES)} "
                            f"(llama.cpp's Q8_0 and Q4_0), not {quantize}")
        path = Path(path)
        config = hf_folder.read_config(path)
        hf_folder.check_remote_code(path, config, trust_remote_code)
        tokenizer = hf_folder.load_tokenizer(path, trust_remote_code)
        gguf = convert.gguf_file(path, llama_cpp.__version__, dtype, quantize)
        n_ctx = min(hf_folder.context_length(config), MAX_CONTEXT)
        n = threads()
        model = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=BATCH, n_ubatch=BATCH, n_threads=n,
                                n_threads_batch=n, n_gpu_layers=-1 if device == "gpu" else 0, verbose=False)
        quantization = None
        if quantize:
            quantization = (f"llama.cpp {convert.QUANT_TYPES[quantize][0]} (blocks of 32 weights; "
                            f"--group-size does not apply)")
        backend = cls(model, tokenizer, path, config, device, dtype if not quantize else "float32", quantization)
        backend.gguf, backend.threads, backend.tensors = gguf, n, gguf_tensors(gguf)
        backend.context_length = n_ctx
        return backend

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.owner: LlamaCppSession | None = None
        self.n_vocab = self.model.n_vocab()
        self._batch = llama_cpp.llama_batch_init(BATCH, 0, 1)

    # -- the context (one sequence, id 0) --

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.model.ctx), True)

    def remove_from(self, position: int) -> None:
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.model.ctx), 0, position, -1)

    def decode(self, ids: list[int], start: int, want: list[int]) -> np.ndarray:
        """Feed `ids` at positions start.., in batches; float32 logits of the positions in `want`
        (indices into ids), each copied out before the next llama_decode overwrites it."""
        ctx, batch, wanted = self.model.ctx, self._batch, set(want)
        rows = []
        for at in range(0, len(ids), BATCH):
            chunk = ids[at:at + BATCH]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i] = token, start + at + i
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                batch.logits[i] = (at + i) in wanted
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise UserError(f"llama.cpp could not decode {len(chunk)} tokens at position {start + at}")
            for i in range(len(chunk)):
                if (at + i) in wanted:
                    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return np.stack(rows) if rows else np.zeros((0, self.n_vocab), np.float32)

    # -- the contract --

    def session(self) -> LlamaCppSession:
        return LlamaCppSession(self)

    def memory(self) -> MemoryStats:
        return MemoryStats(host.current_rss_bytes(), host.peak_rss_bytes(), "process peak RSS")

    def reset_peak_memory(self) -> None:
        host.reset_peak_rss()

    def info(self) -> ModelInfo:
        sizes, types = self.tensors
        weight_bytes = sum(sizes.values())
        # the input embedding is read one row per token, unless the output head is tied to it
        embed = sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0
        return ModelInfo(
            backend=self.name, path=str(self.path), architecture=(self.config.get("architectures") or ["?"])[0],
            model_type=self.config.get("model_type", "?"), parameters=hf_folder.parameter_count(self.path),
            dtype=self.dtype, device=self.device, weight_bytes=weight_bytes,
            decode_bytes_per_token=weight_bytes - embed, vocab_size=self.vocab_size,
            context_length=self.context_length, quantization=self.quantization,
            source={**(self.source or {}), "gguf": str(self.gguf), "gguf_tensor_types": types,
                    "threads": self.threads},
            versions={"llama-cpp-python": llama_cpp.__version__})

    def close(self) -> None:
        if self.model is not None:
            llama_cpp.llama_batch_free(self._batch)
            self.model.close()
            self.model = None
