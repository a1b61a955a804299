"""Build HF-format model folders with seeded random weights, offline.

`random:<alias>` folders have the real architecture at full size (speed and
memory do not depend on weight values); `tiny:<alias>` folders have the same
architecture family at toy size, for tests. Both carry a small byte-level BPE
tokenizer trained here (no tokenizer can be downloaded) with the family's
special tokens and chat template, and a config.json with the Hub's keys
(`rope_theta`, `rotary_pct`, ...) rather than transformers 5's
`rope_parameters`, so both engines read the same architecture.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from backends.folders import hf_folder

# Chat templates of the families, written to match what the real models use.
TEMPLATES = {
    "zephyr": (  # TinyLlama-1.1B-Chat
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    "llama3": (  # Llama-3.x-Instruct (without the date/tools preamble)
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "chatml": (  # StableLM-2-chat
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "smollm2": (  # SmolLM2-Instruct: ChatML with a default system message (as its Hub folder has it)
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"),
    "base": None,  # Pythia: a base model, no template
}

# (bos, eos, extra special tokens, generation EOS tokens, add BOS when encoding)
SPECIALS = {
    "zephyr": ("<s>", "</s>", ["<unk>"], ["</s>"], True),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
               ["<|end_of_text|>", "<|eot_id|>"], True),
    "chatml": ("<|endoftext|>", "<|endoftext|>", ["<|im_start|>", "<|im_end|>"], ["<|endoftext|>", "<|im_end|>"],
               False),
    "smollm2": ("<|im_start|>", "<|im_end|>", ["<|endoftext|>"], ["<|im_end|>"], False),
    "base": ("<|endoftext|>", "<|endoftext|>", [], ["<|endoftext|>"], False),
}

# transformers 5 renamed some weights; Hub folders (and mlx-lm) use the old names.
HUB_NAMES = {"gpt_neox": {"lm_head.": "embed_out."}}

TOKENIZER_VOCAB = 1000  # trained size; tiny models' embedding tables have 1024 rows

# Toy dimensions per architecture (heads/kv-heads keep each family's shape: GQA, partial rotary...)
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "stablelm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4),
    "gpt_neox": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
}

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones before it.
Speculative decoding drafts several tokens with a small model and verifies them with a large one in a single pass.
Low-rank adaptation trains two small matrices beside each frozen weight; the base model does not change.
Quantization stores weights in four or eight bits, which saves memory and bandwidth at some cost in quality.
The following are multiple choice questions (with answers) about abstract algebra, computer security,
elementary mathematics, high school physics, high school chemistry, logical fallacies, machine learning,
professional law, world religions and us foreign policy. Answer: A. B. C. D.
Why is the sky blue? Sunlight scatters off the molecules of the air, and blue light scatters the most.
Water boils at 100 degrees Celsius at sea level. Paris is the capital of France; Tokyo is the capital of Japan.
def add(a, b): return a + b  # 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71 {"key": [1, 2, 3]} <tag/> x = y * z - w / v
User: Hello! Assistant: Hi, how can I help you today? Please explain, summarise, translate and answer briefly.
"""


def _train_tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, extra, _, add_bos = SPECIALS[family]
    specials = list(dict.fromkeys([bos, eos, *extra]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=None,
        pad_token=eos, chat_template=TEMPLATES[family], clean_up_tokenization_spaces=False,
        model_max_length=10**6)


def _hf_config(config: dict):
    from transformers import AutoConfig

    keys = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    return AutoConfig.for_model(config["model_type"], **keys)


def _parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the transformers model, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(config))
    # named_parameters() lists a tied output head once (as the input embedding), as save_pretrained does.
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def count_parameters(config: dict) -> int:
    total = 0
    for shape in _parameter_shapes(config).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def build_folder(out: Path, config: dict, family: str, *, tiny: bool, seed: int = 0, tokenizer=None) -> Path:
    """Write an HF-format folder at `out` (atomically: built aside, then renamed). `tokenizer`: a
    real one to carry instead of the home-made one (its vocabulary sizes the embeddings), so that
    tools that know only published tokenizers (llama.cpp's converter) take the folder."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    config = dict(config)
    if tiny:
        config.update(TINY[config["model_type"]], vocab_size=1024, max_position_embeddings=512)
        if "head_dim" in config:
            config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
        if config.get("rope_scaling"):  # llama3 scaling needs original context < context
            config["rope_scaling"] = dict(config["rope_scaling"], original_max_position_embeddings=128)
    if tokenizer is None:
        tokenizer = _train_tokenizer(family)
        _, eos, _, gen_eos, _ = SPECIALS[family]
    else:
        config["vocab_size"] = len(tokenizer)
        eos, gen_eos = tokenizer.eos_token, [tokenizer.eos_token]
    config["bos_token_id"] = tokenizer.bos_token_id
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids(eos)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in gen_eos]
    dtype = torch.float32 if tiny else torch.bfloat16
    config["torch_dtype"] = "float32" if tiny else "bfloat16"
    # Tiny models get peaked output distributions (std 0.25), so greedy choices are not
    # near-ties that float rounding could flip between engines; full size uses the real init.
    std = 0.25 if tiny else config.get("initializer_range", 0.02)

    tensors = {}
    renames = HUB_NAMES.get(config["model_type"], {})
    for name, shape in _parameter_shapes(config).items():
        for new, old in renames.items():
            name = old + name[len(new):] if name.startswith(new) else name
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if len(shape) == 1 and "bias" in name:
            t = torch.zeros(shape)
        elif len(shape) == 1:  # norm scales
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        tensors[name] = t.to(dtype).contiguous()

    with hf_folder.building(out) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        del tensors
        tokenizer.save_pretrained(tmp)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids}, indent=2))
        config["billion_synthetic"] = {"kind": "tiny" if tiny else "random", "seed": seed,
                                       "note": "seeded random weights: measures speed and memory, not quality"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out
