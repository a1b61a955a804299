"""Every unreadable weight, config or tokenizer file is a one-line error naming the file."""

from __future__ import annotations

import json
import logging
import shutil

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
