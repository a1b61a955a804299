"""The runner's pieces that every command relies on: checkpoints that survive a torn last line,
checkpoint identities that change with the model's content, load options decided once per engine."""

from __future__ import annotations

import json

from billion.records.checkpoint import Checkpoint


def test_a_torn_last_line_is_skipped_and_appending_starts_a_new_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"a": 2, "b"')  # a crash mid-write
    cp = Checkpoint(path)
    assert cp.load() == [{"a": 1}]
    cp.append([{"a": 3}])
    assert cp.load() == [{"a": 1}, {"a": 3}]
    path.write_bytes(b'{"a": 1}\n\xff\xfe{"a"\n')  # undecodable bytes are one more torn line
    assert Checkpoint(path).load() == [{"a": 1}]
    cp.remove()
    assert not path.exists() and Checkpoint(path).load() == []


def test_checkpoint_identity_follows_the_model_content(tmp_path, tiny_folder):
    import shutil

    from billion.loading import LoadOptions, resolve
    from billion.runner import EngineRun, Runner
    from backends.types import ModelInfo

    folder = tmp_path / "m"
    shutil.copytree(tiny_folder("tinyllama"), folder)
    info = ModelInfo("torch", str(folder), "LlamaForCausalLM", "llama", 1, "float32", "cpu", 4, 4, 10, 10)

    def path():
        runner = Runner("mmlu", resolve(str(folder)), LoadOptions(), None, tmp_path / "results")
        return runner.checkpoint(EngineRun("torch", None, info, 0.0), {"shots": 5}).path

    before = path()
    assert path() == before  # the same folder, the same run: the same file
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert path() != before  # the folder changed: an old run must not be resumed


def test_compile_is_dropped_for_engines_without_it_and_said_once():
    from billion.loading import LoadOptions

    options = LoadOptions(compile=True)
    assert options.for_engine("torch") == (options, None)
    mlx, note = options.for_engine("mlx")
    assert mlx.compile is False and "--compile is a torch option" in note
