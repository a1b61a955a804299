"""int8/int4 weights on both engines: load, generate, honest byte counts, quality
against full precision, quantized folders that load back, and clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from backends.types import GenerationConfig, UserError
from billion.tasks import quality
from billion.cli import cli
from billion.loading import LoadOptions, resolve
from billion.loading import load as load_model


def load(engine, folder, progress=False, **options):
    """A folder resolved, then loaded with these options."""
    return load_model(engine, resolve(str(folder), progress=progress), LoadOptions(**options))
from tests.conftest import ENGINES

PROMPT = "Why is the sky blue? Sunlight scatters off"


def _load(engine, tiny_folder, quantize=None, alias="tinyllama", **kw):
    return load(engine, str(tiny_folder(alias)), device="cpu", dtype="float32", quantize=quantize,
                progress=False, **kw)


@pytest.mark.parametrize("engine", ENGINES)
def test_int8_and_int4_load_generate_and_weigh_less(tiny_folder, tiny_model, engine):
    full = tiny_model(engine).info()
    sizes = {}
    for scheme in ("int8", "int4"):
        b = _load(engine, tiny_folder, scheme)
        info = b.info()
        assert info.quantization.startswith(scheme)
        assert info.parameters == full.parameters
        out = b.generate(b.tokenize(PROMPT), GenerationConfig(max_tokens=8, ignore_eos=True))
        assert len(out) == 8
        assert info.weight_bytes < full.weight_bytes
        assert info.decode_bytes_per_token < full.decode_bytes_per_token
        sizes[scheme] = info.decode_bytes_per_token
        b.close()
    # the layers decode reads are packed: 4 bits weigh less than 8 on both engines
    assert sizes["int4"] < sizes["int8"] < full.decode_bytes_per_token / 3


def test_mlx_packs_the_tied_head_with_its_embedding(tiny_folder, tiny_model):
    # llama-3.2-1b ties its output head to the embedding: mlx-lm quantizes both as one table
    full = tiny_model("mlx", "llama-3.2-1b").info()
    b = _load("mlx", tiny_folder, "int4", alias="llama-3.2-1b")
    assert b.info().weight_bytes < full.weight_bytes / 5
    b.close()


def test_kl_maths():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)) * 3
    targets = np.array([0, 1, 2, 3, 4, 0])
    same = quality.Scored(quality.log_softmax(logits).astype(np.float32), targets)
    m = quality.compare(same, same)
    assert m["mean_kl"] == pytest.approx(0, abs=1e-6) and m["max_kl"] == pytest.approx(0, abs=1e-6)
    assert m["top1_agreement"] == 1.0 and m["ppl_full"] == pytest.approx(m["ppl_quant"])
    # two-token vocabulary: KL(p || q) written out by hand
    p, q = np.log([[0.9, 0.1]]), np.log([[0.6, 0.4]])
    m = quality.compare(quality.Scored(p, np.array([1])), quality.Scored(q, np.array([1])))
    assert m["mean_kl"] == pytest.approx(0.9 * np.log(0.9 / 0.6) + 0.1 * np.log(0.1 / 0.4))
    assert m["ppl_full"] == pytest.approx(10) and m["ppl_quant"] == pytest.approx(2.5)
    assert m["top1_agreement"] == 1.0 and m["mean_delta_p"] == pytest.approx(0.3)


@pytest.mark.parametrize("engine", ENGINES)
def test_kl_small_for_int8_and_reported_for_int4(tiny_folder, engine):
    cfg = quality.QualityConfig(ctx=96, chunks=2)
    result = quality.measure(lambda q: _load(engine, tiny_folder, q), ["int8", "int4"],
                             quality.default_text(), cfg)
    int8, int4 = result.metrics["int8"], result.metrics["int4"]
    assert int8["positions"] == int4["positions"] == 2 * 48
    assert int8["mean_kl"] < 0.02 and int8["top1_agreement"] > 0.8
    assert int8["mean_kl"] < int4["mean_kl"] < 5
    assert np.isfinite([int4["p99_kl"], int4["ppl_quant"], int4["ppl_full"]]).all()
    assert int8["ppl_full"] == int4["ppl_full"]


@pytest.mark.parametrize("engine", ENGINES)
def test_quantized_folder_round_trip(tiny_folder, tmp_path, engine):
    out = tmp_path / f"{engine}-int4"
    result = CliRunner().invoke(cli, ["quantize", "-m", str(tiny_folder()), "-b", engine, "--bits", "4",
                                      "--device", "cpu", "--dtype", "float32", "--out", str(out),
                                      "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    record = json.loads(next((tmp_path / "results").glob("quantize-*.json")).read_text())
    assert record["metrics"]["round_trip_max_abs_logit_diff"] < 1e-5
    assert record["metrics"]["weight_ratio"] < 0.8
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert on_disk < sum(f.stat().st_size for f in tiny_folder().glob("*.safetensors"))

    back = load(engine, str(out), device="cpu", dtype="float32", progress=False)
    assert "from folder" in back.info().quantization
    assert len(back.generate(back.tokenize(PROMPT), GenerationConfig(max_tokens=4, ignore_eos=True))) == 4
    with pytest.raises(UserError, match="already quantized"):
        load(engine, str(out), device="cpu", dtype="float32", quantize="int8", progress=False)
    back.close()


def test_mlx_folder_keeps_packed_weights_whatever_the_dtype(tiny_folder, tmp_path):
    import mlx.core as mx

    b = _load("mlx", tiny_folder)
    b.save_quantized_folder(tmp_path / "q", "int8", 64)
    for dtype in ("float32", "bfloat16"):
        again = load("mlx", str(tmp_path / "q"), device="cpu", dtype=dtype, progress=False)
        proj = again.model.model.layers[0].self_attn.q_proj
        assert proj.weight.dtype == mx.uint32 and proj.bits == 8  # set_dtype casts floating tensors only
        assert proj.scales.dtype == getattr(mx, dtype)


@pytest.mark.parametrize("engine, scheme, group, message", [
    ("torch", "bnb-int8", 64, "needs a CUDA GPU; on cpu use --quantize int8 or int4"),
    ("torch", "bnb-int4", 64, "needs a CUDA GPU"),
    ("torch", "int4", 48, "group size of 32, 64, 128, 256"),
    ("mlx", "bnb-int4", 64, "the MLX engine quantizes with int8, int4"),
    ("mlx", "int4", 16, "group size of 32, 64, 128"),
])
def test_unsupported_scheme_is_a_clear_error(tiny_folder, engine, scheme, group, message):
    with pytest.raises(UserError, match=message):
        _load(engine, tiny_folder, scheme, group_size=group)


def test_torch_devices_without_kernels_say_what_works():
    import torch

    from backends.torch_engine.quant import check_scheme

    with pytest.raises(UserError, match="no int8/int4 weight kernels on MPS.*--backend mlx"):
        check_scheme("int4", 64, "mps", torch.float16)
    with pytest.raises(UserError, match="runs in bfloat16"):
        check_scheme("int4", 64, "cuda", torch.float32)


def test_quant_bench_and_quality_commands(tiny_folder, tmp_path):
    runner = CliRunner()
    model = str(tiny_folder())
    result = runner.invoke(cli, ["quant-bench", "-m", model, "-b", "all", "--precisions", "full,int4",
                                 "--device", "cpu", "-p", "8", "-n", "4", "-r", "1", "--warmup", "0",
                                 "--results-dir", str(tmp_path / "bench")])
    assert result.exit_code == 0, result.output
    records = [json.loads(f.read_text()) for f in (tmp_path / "bench").glob("bench-*.json")]
    assert sorted((r["backend"], r["config"]["quantize"] or "full") for r in records) == [
        ("mlx", "full"), ("mlx", "int4"), ("torch", "full"), ("torch", "int4")]
    read = {(r["backend"], r["config"]["quantize"] or "full"): r["model_info"]["decode_bytes_per_token"]
            for r in records}
    for engine in ("mlx", "torch"):  # int4 weights (plus scales) read far fewer bytes a token than float32
        assert read[(engine, "int4")] < 0.6 * read[(engine, "full")], engine
    for r in records:  # the bandwidth ceiling comes from the bytes decode reads at that precision
        m = r["metrics"]
        per_token = r["model_info"]["decode_bytes_per_token"]
        assert m["bandwidth_ceiling_tps"] == pytest.approx(m["bandwidth_gbs"] * 1e9 / per_token)
    assert "quant-bench" in result.output and "int4" in result.output

    result = runner.invoke(cli, ["quality", "-m", model, "-b", "all", "-q", "int8", "--device", "cpu",
                                 "--ctx", "64", "--chunks", "1", "--results-dir", str(tmp_path / "quality")])
    assert result.exit_code == 0, result.output
    records = [json.loads(f.read_text()) for f in (tmp_path / "quality").glob("quality-*.json")]
    assert sorted(r["backend"] for r in records) == ["mlx", "torch"]
    assert all(r["config"]["quantize"] == "int8" and r["metrics"]["positions"] == 32 for r in records)

    result = runner.invoke(cli, ["quant-bench", "-m", model, "--precisions", "full,int3"])
    assert result.exit_code != 0 and "unknown precision 'int3'" in result.output


# ---------------------------------------------------------------- QLoRA and fusing into a quantized base

# The torch engine trains through torchao int8 (its int4 kernels have no backward pass).
QLORA_SCHEME = {"mlx": "int8", "torch": "int8"}


def _qlora(engine, tiny_folder, tmp_path, scheme):
    from backends.training import TrainConfig
    from billion.tasks import finetune_data as data

    b = _load(engine, tiny_folder, scheme)
    examples, _ = data.encode(b, data.read_rows("sample")[:12], 256, data.use_chat(b, None))
    cfg = TrainConfig(steps=5, batch_size=4, grad_accum=1, learning_rate=1e-2, dropout=0.0, eval_every=5,
                      save_every=5)
    return b, b.lora_train(examples, examples[:4], cfg, tmp_path / "adapter")


@pytest.mark.parametrize("engine", ENGINES)
def test_qlora_lowers_the_loss_and_fuses_into_the_quantized_base(tiny_folder, tmp_path, engine):
    from billion.tasks.quantized_fuse import CHECK_FILE, fuse_quantized

    b, result = _qlora(engine, tiny_folder, tmp_path, QLORA_SCHEME[engine])
    assert result.steps_done == 5 and result.final_val_loss < result.initial_val_loss - 0.05
    ids = b.tokenize(PROMPT)
    check = fuse_quantized(b, tmp_path / "fused")
    assert check["adapter_effect_kept"] > 0.7 and check["base_vs_adapted_top1_agreement"] < 0.95
    fused_in_memory = b.logits(ids)
    again = load(engine, str(tmp_path / "fused"), device="cpu", dtype="float32", progress=False)
    assert "from folder" in again.info().quantization and (tmp_path / "fused" / CHECK_FILE).is_file()
    np.testing.assert_allclose(again.logits(ids), fused_in_memory, atol=1e-4)
    again.close()
    b.close()


def test_fuse_that_would_drop_the_adapter_is_refused(tiny_folder, tmp_path):
    from mlx_lm.tuner.lora import LoRALinear

    from billion.tasks.quantized_fuse import fuse_quantized

    b, _ = _qlora("mlx", tiny_folder, tmp_path, "int4")
    for _, m in b.model.named_modules():  # an adapter far smaller than a 4-bit step
        if isinstance(m, LoRALinear):
            m.scale = m.scale * 1e-3
    with pytest.raises(UserError, match="kept .* of the adapter's effect.*--keep-fused-layers-full"):
        fuse_quantized(b, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


def test_int4_fuse_can_keep_the_fused_layers_in_full_precision(tiny_folder, tmp_path):
    import mlx.core as mx

    from billion.tasks.quantized_fuse import fuse_quantized

    b, _ = _qlora("mlx", tiny_folder, tmp_path, "int4")
    check = fuse_quantized(b, tmp_path / "fused", requantize=False)
    assert check["adapter_effect_kept"] > 0.99
    again = load("mlx", str(tmp_path / "fused"), device="cpu", dtype="float32", progress=False)
    attn = again.model.model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == mx.float32 and attn.k_proj.weight.dtype == mx.uint32


def test_torch_int4_qlora_says_what_works(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="bnb-int4.*on CPU use --quantize int8"):
        _qlora("torch", tiny_folder, tmp_path, "int4")


def test_quality_reports_the_mmlu_difference_when_data_is_present(tiny_folder, tmp_path):
    from tests.mmlu_fixture import write_csv_layout

    data_dir = write_csv_layout(tmp_path / "mmlu")
    result = CliRunner().invoke(cli, [
        "quality", "-m", str(tiny_folder()), "-b", "all", "-q", "int4", "--device", "cpu", "--ctx", "64",
        "--chunks", "1", "--mmlu", "--mmlu-data", str(data_dir), "--mmlu-shots", "0", "--mmlu-limit", "2", "--mmlu-subjects",
        "abstract_algebra", "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    records = list((tmp_path / "results").glob("quality-*.json"))
    assert len(records) == 2
    for f in records:
        m = json.loads(f.read_text())["metrics"]
        assert m["mmlu_questions"] == 2 and 0 <= m["mmlu_same_answer_share"] <= 1
        assert m["mmlu_acc_diff"] == pytest.approx(m["mmlu_acc_quant"] - m["mmlu_acc_full"])
    assert "mlx int4: MMLU accuracy" in result.output and "torch int4: MMLU accuracy" in result.output


@pytest.mark.parametrize("engine", ENGINES)
def test_adapter_fuse_into_a_quantized_folder(tiny_folder, tmp_path, engine):
    # an adapter trained on the full-precision model, fused into a quantized folder of it
    from backends.training import TrainConfig
    from billion.tasks import finetune_data as data

    b = _load(engine, tiny_folder)
    examples, _ = data.encode(b, data.read_rows("sample")[:12], 256, data.use_chat(b, None))
    cfg = TrainConfig(steps=3, batch_size=4, grad_accum=1, learning_rate=2e-2, dropout=0.0, eval_every=5,
                      save_every=5)
    b.lora_train(examples, [], cfg, tmp_path / "adapter")
    b.close()
    runner = CliRunner()
    assert runner.invoke(cli, ["quantize", "-m", str(tiny_folder()), "-b", engine, "--bits", "8", "--device", "cpu",
                               "--out", str(tmp_path / "q8"), "--results-dir", str(tmp_path)]).exit_code == 0
    result = runner.invoke(cli, ["adapter-fuse", "-m", str(tmp_path / "q8"), str(tmp_path / "adapter"),
                                 str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    check = json.loads((tmp_path / "fused" / "fuse_check.json").read_text())
    assert check["adapter_effect_kept"] > 0.7
    assert "from folder" in load(engine, str(tmp_path / "fused"), device="cpu", progress=False).info().quantization


def test_torch_cpu_quantization_measures_its_speed_and_warns_when_slower(tiny_folder, monkeypatch, caplog):
    """On CPU the load measures one decode-shaped matmul quantized and in full precision: the
    factor is in the quantization description, and a slower kernel is a warning naming it."""
    import logging

    from backends.torch_engine import quant as torch_quant

    times = iter([300.0, 100.0])  # quantized first, then full precision
    monkeypatch.setattr(torch_quant, "_best_us", lambda layer: next(times))
    with caplog.at_level(logging.WARNING, logger="billion"):
        b = _load("torch", tiny_folder, "int8")
    assert "one-token matmul 3.00x the time of float32" in b.quantization
    assert "saves memory but costs speed" in caplog.text and "3.0x" in caplog.text
    b.close()
