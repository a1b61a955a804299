"""Errors and the plain types that cross the engine boundary.

A leaf: imports nothing of billion's, so every module of the engine layer can
use these without an import cycle. Plain Python only: ints, lists of ints,
floats, str and small frozen dataclasses, never an mx.array or a torch.Tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class UserError(Exception):
    """A mistake the user can fix (bad model, bad data, not enough memory...).

    The CLI prints these as one line, without a traceback.
    """


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. The sampling rule (order, exact semantics) is backends/sampling.py's, applied
    by the one scheduler (backends/batching.py) on every engine alike."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: every engine does the same work
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; over prompt and output tokens (CTRL, transformers, vLLM)
    presence_penalty: float = 0.0  # OpenAI's: over the output tokens only
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one (not included)
    # llguidance's grammar text (backends/constraints.py): every token is drawn from those it allows
    grammar: str | None = None
    # each token's log-probability and the `logprobs` most likely tokens' (log-softmax of the
    # engine's float32 logits, before any sampling rule), on its Chunk; None: off
    logprobs: int | None = None


@dataclass(frozen=True)
class Chunk:
    """One generated token, timed after the device really computed it."""

    token: int
    text: str  # the new text this token completes (may be "" mid-character)
    time_s: float  # time.perf_counter() after synchronising the device
    from_draft: bool = False  # accepted from a speculative draft
    # "max_tokens" on the chunk that reached gen.max_tokens, "stop" on the chunk that completed a
    # stop string (gen.stop; its text ends before the stop string); None otherwise. A stream that
    # ends with no such chunk stopped at EOS (which is not yielded), unless its consumer stopped it.
    finish_reason: str | None = None
    # with gen.logprobs: (token text, log-probability, ((text, log-probability), ...) the
    # gen.logprobs most likely), sampling.logprobs' values (batching.Output)
    logprobs: tuple | None = None


@dataclass(frozen=True)
class MemoryStats:
    current_bytes: int | None
    peak_bytes: int | None
    source: str  # e.g. "mx.get_peak_memory", "torch.cuda.max_memory_allocated", "process peak RSS"


@dataclass(frozen=True)
class ModelInfo:
    backend: str
    path: str
    architecture: str
    model_type: str
    parameters: int
    dtype: str
    device: str
    weight_bytes: int
    # bytes one decode step reads: all weights except the input embedding table
    # (a lookup reads one row), unless it is tied to the output head.
    decode_bytes_per_token: int
    vocab_size: int
    context_length: int
    quantization: str | None = None
    versions: dict = field(default_factory=dict)
    # where the weights came from when billion made the folder: a GGUF file (name, sha256, its
    # quantization type) or seeded random weights; None for folders as published
    source: dict | None = None
    # how decoding is compiled (torch --compile), with the compile time once paid; None: eager
    compiled: str | None = None
    # the matmul kernels where they are not the framework's default (torch on x86 CPUs: oneDNN)
    kernels: str | None = None
