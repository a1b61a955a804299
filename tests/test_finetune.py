"""LoRA fine-tuning on both engines: data shapes, masks, training, adapters, resume, CLI.

Tiny Llama and GPT-NeoX models, CPU, offline. Both engines train on the same
examples in the same order from the same initial adapter with dropout 0, so
their step losses must agree, and an adapter converted from one engine's
format must give the other engine the same logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import backends
from backends.folders import adapters
from backends.types import UserError
from backends.training import TrainConfig, plan_steps
from billion.tasks import finetune_data as data
from tests.conftest import ENGINES

FAMILIES = ["tinyllama", "pythia-1b"]  # Llama (q_proj, v_proj) and GPT-NeoX (fused query_key_value)
IDS = list(range(3, 40))


def fresh(tiny_folder, engine, alias):
    """A model of its own: training changes it in place."""
    return backends.get(engine).load(tiny_folder(alias), device="cpu", dtype="float32")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- data


def test_each_shape_tokenizes_with_its_mask(tiny_model, tmp_path):
    chat_model, plain_model = tiny_model("torch", "tinyllama"), tiny_model("torch", "pythia-1b")
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "Water boils at 100 degrees."},
        {"prompt": "Capital of France?", "completion": " Paris."},
        {"instruction": "Give the opposite of 'hot'.", "input": "", "output": "cold"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
    ])
    rows = data.read_rows(str(f))
    assert [data.shape_of(r) for r in rows] == ["text", "prompt", "alpaca", "messages"]

    def targets(model, row, chat):
        ids, mask = data.encode_row(model, row, chat)
        assert len(ids) == len(mask)
        return model.tokenizer.decode([t for t, m in zip(ids, mask) if m])

    eos = chat_model.tokenizer.eos_token
    assert targets(chat_model, rows[0], True).startswith("Water boils") or "boils at 100" in targets(chat_model, rows[0], True)
    assert targets(chat_model, rows[0], True).endswith(eos)
    # chat template: only the assistant turns (with their end token) are targets
    assert targets(chat_model, rows[1], True) == f" Paris.{eos}\n"
    assert targets(chat_model, rows[2], True) == f"cold{eos}\n"
    assert targets(chat_model, rows[3], True) == f"Hello!{eos}\nGoodbye.{eos}\n"
    # no chat template: prompt + completion as written (trl), alpaca prompt for instructions
    peos = plain_model.tokenizer.eos_token
    assert targets(plain_model, rows[1], False) == f" Paris.{peos}"
    ids, mask = data.encode_row(plain_model, rows[2], False)
    assert plain_model.tokenizer.decode(ids).startswith("Below is an instruction")
    assert plain_model.tokenizer.decode([t for t, m in zip(ids, mask) if m]) == f"cold{peos}"
    with pytest.raises(UserError, match=r"d.jsonl:4: .*chat template"):
        data.encode_row(plain_model, rows[3], False)

    sample = data.read_rows("sample")
    assert 90 <= len(sample) <= 110 and {data.shape_of(r) for r in sample} == {"alpaca"}
    examples, dropped = data.encode(chat_model, sample, 512, True)
    train, val = data.split(examples, 0.1, 0)
    assert (len(train), len(val), dropped) == (90, 10, 0) and all(e.mask[0] == 0 for e in examples)


def test_a_data_folder_with_valid_jsonl_gives_the_validation_set(tiny_model, tmp_path):
    from billion.tasks.finetune import FinetuneConfig, prepare

    write_jsonl(tmp_path / "train.jsonl", [{"text": f"line {i}"} for i in range(8)])
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "held out"}, {"text": "also held out"}])
    prepared = prepare(tiny_model("torch", "tinyllama"), FinetuneConfig(data=str(tmp_path), steps=1))
    assert (len(prepared.train), len(prepared.val)) == (8, 2)


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"bad.jsonl:3: not valid JSON"),
    ('{"question": "?", "answer": "!"}', r"bad.jsonl:3: unknown row shape with keys \['answer', 'question'\]"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad.jsonl:3: no assistant message"),
    ('{"prompt": "a", "completion": 3}', r"bad.jsonl:3: 'completion' must be a string"),
])
def test_bad_data_names_file_and_line(tmp_path, line, message):
    f = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "one"}', "", line])
    with pytest.raises(UserError, match=message):
        data.read_rows(str(f))


def test_missing_data_and_offline_hub_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no data at"):
        data.read_rows(str(tmp_path / "nothing.jsonl"))
    with pytest.raises(UserError, match="cannot load the Hub data set 'nobody-xyz/no-such-set'"):
        data.read_rows("nobody-xyz/no-such-set")  # HF_HUB_OFFLINE=1 in conftest


def test_batch_plan_is_seeded_and_covers_full_batches():
    cfg = TrainConfig(steps=7, batch_size=4, grad_accum=2, seed=3)
    plan = plan_steps(10, cfg)
    assert plan == plan_steps(10, cfg) and len(plan) == 7
    assert all(len(step) == 2 and all(len(b) == 4 for b in step) for step in plan)
    first_epoch = [i for step in plan for b in step for i in b][:8]
    assert len(set(first_epoch)) == 8  # no repeats inside an epoch
    with pytest.raises(UserError, match="fewer than one batch"):
        plan_steps(3, cfg)


# ---------------------------------------------------------------- training on both engines


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    """alias -> (models after training, their results, adapter folders, examples); trained once."""
    cache = {}

    def get(alias):
        if alias not in cache:
            out = tmp_path_factory.mktemp(f"ft-{alias}")
            models = {e: fresh(tiny_folder, e, alias) for e in ENGINES}
            chat = data.use_chat(models["mlx"], None)
            examples, _ = data.encode(models["mlx"], data.read_rows("sample")[:12], 256, chat)
            cfg = TrainConfig(steps=5, batch_size=4, grad_accum=1, learning_rate=3e-2, dropout=0.0,
                              eval_every=5, save_every=5)
            results = {e: models[e].lora_train(examples, examples[:4], cfg, out / e) for e in ENGINES}
            cache[alias] = models, results, {e: out / e for e in ENGINES}, out
        return cache[alias]

    return get


@pytest.mark.parametrize("alias", FAMILIES)
def test_training_lowers_loss_and_engines_agree_step_by_step(trained, alias):
    _, results, _, _ = trained(alias)
    for engine, r in results.items():
        assert r.steps_done == 5 and not r.interrupted
        assert r.final_val_loss < r.initial_val_loss - 0.05, engine
        assert r.train_tokens_per_s > 0 and r.peak_memory_bytes and r.memory_source
    mlx_losses = [m.loss for m in results["mlx"].history]
    torch_losses = [m.loss for m in results["torch"].history]
    # float32, same ids/order/init: Llama agrees to rounding; GPT-NeoX differs by mlx-lm's tanh GELU
    np.testing.assert_allclose(mlx_losses, torch_losses, atol=1e-4 if alias == "tinyllama" else 5e-3)
    assert [m.learning_rate for m in results["mlx"].history] == [m.learning_rate for m in results["torch"].history]
    accuracy = {e: [m.token_accuracy for m in r.history] for e, r in results.items()}
    np.testing.assert_allclose(accuracy["mlx"], accuracy["torch"], atol=0.02)
    if alias == "tinyllama":
        assert max(accuracy["mlx"]) > 0  # the comparison is not of zeros


@pytest.mark.parametrize("alias", FAMILIES)
def test_saved_adapters_hold_only_lora_weights(trained, alias):
    models, results, folders, _ = trained(alias)
    layers = 2
    per_layer = 1 if alias == "pythia-1b" else 2
    mlx = adapters.read_tensors(folders["mlx"] / adapters.MLX_FILE)
    peft = adapters.read_tensors(folders["torch"] / adapters.PEFT_FILE)
    assert all(k.endswith((".lora_a", ".lora_b")) for k in mlx) and len(mlx) == 2 * layers * per_layer
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in peft) and len(peft) == len(mlx)
    assert results["mlx"].trainable_parameters == results["torch"].trainable_parameters == sum(
        v.size for v in mlx.values())


@pytest.mark.parametrize("alias", FAMILIES)
def test_adapters_round_trip_and_give_the_same_logits_across_engines(trained, tiny_folder, alias):
    models, _, folders, out = trained(alias)
    tol = 1e-4 if alias == "tinyllama" else 5e-3
    # MLX -> PEFT -> MLX is exact
    assert adapters.convert(folders["mlx"], out / "as-peft") == "peft"
    assert adapters.convert(out / "as-peft", out / "back-mlx") == "mlx"
    original = adapters.read_tensors(folders["mlx"] / adapters.MLX_FILE)
    back = adapters.read_tensors(out / "back-mlx" / adapters.MLX_FILE)
    assert original.keys() == back.keys() and all(np.array_equal(original[k], back[k]) for k in original)
    # MLX-trained adapter on torch, torch-trained adapter on MLX: same logits as on the engine that trained it
    adapters.convert(folders["torch"], out / "as-mlx")
    for engine, adapter, trainer in (("torch", out / "as-peft", "mlx"), ("mlx", out / "as-mlx", "torch")):
        other = fresh(tiny_folder, engine, alias)
        base = other.logits(IDS)
        other.apply_adapter(adapter)
        want = models[trainer].logits(IDS)
        got = other.logits(IDS)
        assert np.abs(want - base).max() > 20 * tol  # the adapter changes the logits...
        assert np.abs(got - want).max() < tol  # ...identically on both engines


def test_fused_folder_loads_in_both_engines_with_the_adapted_logits(trained, tiny_folder):
    models, _, folders, out = trained("tinyllama")
    fused = adapters.fuse(tiny_folder("tinyllama"), folders["mlx"], out / "fused")
    want = models["mlx"].logits(IDS)
    for engine in ENGINES:
        got = backends.get(engine).load(fused, device="cpu", dtype="float32").logits(IDS)
        assert np.abs(got - want).max() < 1e-4, engine
    with pytest.raises(UserError, match="already exists"):
        adapters.fuse(tiny_folder("tinyllama"), folders["mlx"], out / "fused")


@pytest.mark.parametrize("engine", ENGINES)
def test_ctrl_c_keeps_a_checkpoint_and_resume_continues_from_its_step(tiny_folder, tmp_path, engine):
    model = fresh(tiny_folder, engine, "tinyllama")
    examples, _ = data.encode(model, data.read_rows("sample")[:8], 64, True)
    cfg = TrainConfig(steps=4, batch_size=4, grad_accum=1, dropout=0.0, eval_every=10, save_every=10)

    def interrupt_at_2(m):
        if m.step == 2:
            raise KeyboardInterrupt

    first = model.lora_train(examples, [], cfg, tmp_path, on_step=interrupt_at_2)
    assert first.interrupted and first.steps_done == 2 and (tmp_path / "checkpoint-2").is_dir()
    again = fresh(tiny_folder, engine, "tinyllama").lora_train(examples, [], cfg, tmp_path, resume=True)
    assert again.start_step == 2 and [m.step for m in again.history] == [3, 4] and not again.interrupted
    # adapter and optimiser state came back: the same losses as a run that was never stopped
    whole = fresh(tiny_folder, engine, "tinyllama").lora_train(examples, [], cfg, tmp_path / "whole")
    np.testing.assert_allclose([m.loss for m in again.history], [m.loss for m in whole.history[2:]], rtol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_target_layer_is_a_clear_error(tiny_folder, tmp_path, engine):
    model = fresh(tiny_folder, engine, "pythia-1b")
    examples, _ = data.encode(model, data.read_rows("sample")[:4], 256, False)
    cfg = TrainConfig(steps=1, targets=("query_key_value", "q_proj"))
    with pytest.raises(UserError, match=r"no linear layer named q_proj .*query_key_value"):
        model.lora_train(examples, [], cfg, tmp_path)


# ---------------------------------------------------------------- CLI


def test_finetune_cli_on_both_engines_writes_records_and_adapters(tmp_path):
    from billion.cli import cli

    out, results = tmp_path / "adapters", tmp_path / "results"
    args = ["finetune", "-b", "all", "-m", "tiny:tinyllama", "--steps", "2", "--batch-size", "2", "--grad-accum",
            "1", "--dropout", "0", "--answer-tokens", "4", "--prompt", "Hi", "--out", str(out),
            "--results-dir", str(results)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "step losses mlx vs torch" in r.output
    records = [json.loads(p.read_text()) for p in sorted(results.glob("finetune-*.json"))]
    assert {rec["backend"] for rec in records} == {"mlx", "torch"}
    for rec in records:
        assert rec["metrics"]["steps_done"] == 2 and len(rec["history"]) == 2
        assert rec["answers"][0]["prompt"] == "Hi" and "after" in rec["answers"][0]
        assert rec["metrics"]["memory_source"] and rec["config"]["train"]["rank"] == 8
    assert (out / "mlx" / adapters.MLX_FILE).is_file() and (out / "torch" / adapters.PEFT_FILE).is_file()
    # a second run into the same folder must not overwrite it silently
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--resume" in again.output
    conv = CliRunner().invoke(cli, ["adapter-convert", str(out / "torch"), str(tmp_path / "conv")])
    assert conv.exit_code == 0 and (tmp_path / "conv" / adapters.MLX_FILE).is_file()


def test_finetune_cli_reports_bad_data_line(tmp_path):
    from billion.cli import cli

    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "fine"}', '{"text": '])
    r = CliRunner().invoke(cli, ["finetune", "-b", "torch", "-m", "tiny:tinyllama", "--data", str(bad),
                                 "--out", str(tmp_path / "o"), "--results-dir", str(tmp_path / "r")])
    assert r.exit_code == 1 and f"{bad}:2: not valid JSON" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_torchrun_two_processes_train_as_one_at_the_same_global_batch(tiny_folder, tmp_path):
    """Data parallel with unchanged code: 2 torchrun processes, global batch 4 (2 each), give the
    step losses of one process with batch 4."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tiny_folder("tinyllama")  # built once here, not by two processes at once
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "billion", "finetune", "-b", "torch", "-m", "tiny:tinyllama", "--device", "cpu", "--steps", "3",
            "--batch-size", "4", "--grad-accum", "2", "--dropout", "0", "--lr", "1e-2", "--eval-every", "3",
            "--prompt", "Hi", "--answer-tokens", "2"]

    def losses(launcher, name):
        out = tmp_path / name
        done = subprocess.run([*launcher, *args, "--out", str(out / "adapters"), "--results-dir", str(out / "r")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        (record,) = [json.loads(f.read_text()) for f in (out / "r").glob("finetune-*.json")]
        return record["metrics"].get("processes"), [h["loss"] for h in record["history"]]

    torchrun = str(Path(sys.executable).parent / "torchrun")
    one_procs, one = losses([sys.executable], "one")
    two_procs, two = losses([torchrun, "--nproc-per-node", "2", "--master-port", "29517"], "two")
    assert (one_procs, two_procs) == (1, 2) and len(one) == len(two) == 3
    np.testing.assert_allclose(two, one, rtol=1e-4)
