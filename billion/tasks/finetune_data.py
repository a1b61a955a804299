"""Fine-tuning data: read rows, turn them into token ids and a loss mask, once.

Both engines train on the `Example`s made here (same ids, same mask), so
formatting and masking cannot drift between them. Row shapes, one per line of
a JSONL file (or per row of a Hub data set):

  {"text": ...}                                  every token is a target
  {"prompt": ..., "completion": ...}             targets: the completion only
  {"instruction": ..., "input": ..., "output": ...}   alpaca; targets: the output
  {"messages": [{"role": ..., "content": ...}]}  chat template; targets: assistant turns

Prompt/completion and alpaca rows are put through the model's chat template
(user turn, assistant turn) when it has one; without one, prompt + completion
are concatenated as written (trl's behaviour) and alpaca rows use the alpaca
prompt. Every example ends with the model's end-of-turn token, as trl does.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backends.batching import common_prefix
from backends.training import Example
from backends.types import UserError
from billion.tasks.jsonl import json_lines

SAMPLE = Path(__file__).parent.parent / "data" / "sample_instructions.jsonl"

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

SHAPES = '{"text"}, {"prompt","completion"}, {"instruction","input","output"} or {"messages":[...]}'


@dataclass(frozen=True)
class Row:
    where: str  # "file:line" or "hub-name[index]", for error messages
    data: dict


# ---------------------------------------------------------------- reading


def read_rows(source: str) -> list[Row]:
    """Rows of a JSONL file, of train.jsonl in a folder, of the built-in sample
    set (`sample`), or of a Hub data set's train split (`org/name`)."""
    if source in ("sample", "", None):
        return read_jsonl(SAMPLE)
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "train.jsonl"
        if not path.is_file():
            raise UserError(f"{source} is a folder without train.jsonl")
    if path.is_file():
        return read_jsonl(path)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return read_hub(source)
    raise UserError(f"no data at {source!r}: give a JSONL file, a folder with train.jsonl, `sample`, "
                    f"or a Hub data set name (org/name)")


def read_validation_rows(source: str) -> list[Row] | None:
    """valid.jsonl beside train.jsonl in a data folder (mlx-lm's layout), else None."""
    path = Path(source or "").expanduser() / "valid.jsonl"
    return read_jsonl(path) if path.is_file() else None


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    for n, data in json_lines(path):
        rows.append(Row(f"{path}:{n}", data))
        shape_of(rows[-1])
    if not rows:
        raise UserError(f"{path} has no examples")
    return rows


def read_hub(name: str) -> list[Row]:
    try:
        import datasets
        ds = datasets.load_dataset(name, split="train")
    except ImportError:
        raise UserError("reading a Hub data set needs the datasets package: pip install datasets") from None
    except Exception as e:  # offline, unknown name, gated: datasets raises many types
        offline = "offline" in str(e).lower() or "connect" in str(e).lower()
        hint = (" (no network, or HF_HUB_OFFLINE is set: the data set must already be in the Hugging Face cache; "
                "or pass a local JSONL file)") if offline else ""
        raise UserError(f"cannot load the Hub data set {name!r}: {str(e).splitlines()[0]}{hint}") from None
    rows = [Row(f"{name}[{i}]", dict(r)) for i, r in enumerate(ds)]
    for r in rows:
        shape_of(r)
    return rows


def shape_of(row: Row) -> str:
    d = row.data
    if not isinstance(d, dict):
        raise UserError(f"{row.where}: expected a JSON object, one of {SHAPES}")
    if "messages" in d:
        msgs = d["messages"]
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise UserError(f"{row.where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{row.where}: no assistant message to train on")
        return "messages"
    for shape, keys in (("prompt", ("prompt", "completion")), ("alpaca", ("instruction", "output")),
                        ("text", ("text",))):
        if all(k in d for k in keys):
            bad = [k for k in (*keys, "input") if k in d and not isinstance(d[k], str)]
            if bad:
                raise UserError(f"{row.where}: {bad[0]!r} must be a string")
            return shape
    raise UserError(f"{row.where}: unknown row shape with keys {sorted(d)}; expected {SHAPES}")


# ---------------------------------------------------------------- tokenising


def use_chat(backend, chat: bool | None) -> bool:
    """Whether instruction rows go through the chat template (None: when the model has one)."""
    if chat and not backend.has_chat_template:
        raise UserError("this model has no chat template; drop --chat")
    return backend.has_chat_template if chat is None else chat


def instruction_prompt(instruction: str, extra: str = "") -> str:
    return ALPACA_INPUT.format(instruction=instruction, input=extra) if extra else ALPACA.format(instruction=instruction)


def prompt_ids(backend, prompt: str, chat: bool) -> list[int]:
    """Token ids a model is asked with: how the before/after prompts and alpaca rows are formatted."""
    if chat:
        return backend.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return backend.tokenize(instruction_prompt(prompt))


def _end_id(backend) -> int:
    eos = backend.tokenizer.eos_token_id
    return eos if eos is not None else next(iter(backend.eos_ids))


def _chat_example(backend, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Ids of the whole conversation; mask 1 on each assistant turn (its text and end token).

    An assistant turn's tokens are those of the conversation up to and including
    it past the conversation before it with the generation prompt (where they
    first differ, should the template not render turns as prefixes).
    """
    ids = backend.apply_chat_template(messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = backend.apply_chat_template(messages[:i], add_generation_prompt=True) if i else []
        upto = backend.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        start, end = common_prefix(before, upto), common_prefix(upto, ids)
        for j in range(start, end):
            mask[j] = 1
    return ids, mask


def encode_row(backend, row: Row, chat: bool) -> tuple[list[int], list[int]]:
    try:
        return _encode_row(backend, row, chat)
    except UserError:
        raise
    except Exception as e:  # a chat template that raises on this row (jinja2, the template's raise_exception)
        if not (chat or shape_of(row) == "messages"):
            raise
        why = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        raise UserError(f"{row.where}: the model's chat template fails on this row ({why})") from None


def _encode_row(backend, row: Row, chat: bool) -> tuple[list[int], list[int]]:
    shape, d = shape_of(row), row.data
    if shape == "messages":
        if not backend.has_chat_template:
            raise UserError(f"{row.where}: \"messages\" rows need a model with a chat template")
        return _chat_example(backend, d["messages"])
    if shape == "text":
        ids = backend.tokenize(d["text"]) + [_end_id(backend)]
        return ids, [0] + [1] * (len(ids) - 1)
    if shape == "alpaca":
        prompt, completion = d["instruction"], d["output"]
        if d.get("input"):
            prompt = f"{prompt}\n\n{d['input']}" if chat else instruction_prompt(prompt, d["input"])
        elif not chat:
            prompt = instruction_prompt(prompt)
    else:
        prompt, completion = d["prompt"], d["completion"]
    if chat:
        return _chat_example(backend, [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": completion}])
    head = backend.tokenize(prompt)
    tail = backend.tokenize(completion, add_special_tokens=False) + [_end_id(backend)]
    return head + tail, [0] * len(head) + [1] * len(tail)


def encode(backend, rows: list[Row], max_seq_len: int, chat: bool) -> tuple[list[Example], int]:
    """Examples (truncated to max_seq_len), and how many rows were dropped
    because truncation left them no target."""
    out, dropped = [], 0
    for row in rows:
        ids, mask = encode_row(backend, row, chat)
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        mask[0] = 0  # the first token is never predicted
        if not any(mask):
            dropped += 1
            continue
        out.append(Example(tuple(ids), tuple(mask)))
    if not out:
        raise UserError(f"no example has a target token within --max-seq-len {max_seq_len}")
    return out, dropped


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded validation split (at least one example when val_fraction > 0)."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-split must be in [0, 1), got {val_fraction}")
    n_val = math.ceil(len(examples) * val_fraction) if val_fraction else 0
    if n_val and n_val >= len(examples):
        raise UserError(f"{len(examples)} examples are too few for a validation split of {val_fraction}")
    chosen = set(np.random.default_rng(seed).permutation(len(examples))[:n_val].tolist())
    return ([e for i, e in enumerate(examples) if i not in chosen],
            [e for i, e in enumerate(examples) if i in chosen])


def fingerprint(examples: list[Example]) -> str:
    """A hash of the token ids and masks: resuming checks it is the same data."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.ids, e.mask]).encode())
    return h.hexdigest()[:16]
