"""`billion report --markdown`: tables with a source column, and PNG charts drawn from the records only."""

from __future__ import annotations

import re
import time

from click.testing import CliRunner

from billion.cli import cli
from billion.records.store import make_record, write_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GGUF = "gguf:smollm2-135m"
GGUF_SOURCE = {"kind": "gguf", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "quantization": "Q4_1",
               "note": "Q4_1 GGUF weights, dequantized: not the original weights"}


def _write(results, task, backend, config, metrics, model="random:tinyllama", started=None, **extra):
    if model == GGUF:
        extra["model_source"] = GGUF_SOURCE
    rec = make_record(task, backend, model, config, metrics, started=started or time.time(), extra=extra)
    return write_record(rec, results)


def _bench(results, backend, quantize=None, decode_tps=10.0, **kw):
    metrics = {"decode_tps": decode_tps, "bandwidth_fraction": 0.25, "prefill_tps": 100.0, "ttft_s": 0.1}
    return _write(results, "bench", backend, {"dtype": "float16", "quantize": quantize}, metrics, **kw)


def _finetune(results, backend):
    history = [{"step": s, "loss": 3.0 - 0.1 * s, "val_loss": 2.9 if s == 4 else None} for s in range(1, 5)]
    _write(results, "finetune", backend, {"data": "sample"}, {"train_loss_final": 2.6}, history=history)


def _mmlu(results, backend, shots):
    subjects = {"abstract_algebra": {"acc": 0.5, "acc_stderr": 0.1, "questions": 4},
                "world_religions": {"acc": 0.75, "acc_stderr": 0.1, "questions": 4}}
    _write(results, "mmlu", backend, {"shots": shots}, {"questions": 8, "acc_micro": 0.625}, subjects=subjects)


def _speculate(results, backend):
    per_k = {str(k): {"speedup": 1 + 0.2 * k, "predicted_speedup": 1 + 0.25 * k} for k in (1, 2, 4)}
    _write(results, "speculate", backend, {"ks": [1, 2, 4], "draft": "layers:2"}, {"per_k": per_k, "speedup": 1.8})


def _quality(results, backend, quantize, kl):
    _write(results, "quality", backend, {"quantize": quantize}, {"mean_kl": kl, "mean_kl_stderr": kl / 10},
           model="tiny:tinyllama")


def _report(results, *args):
    md = results / "README.md"
    r = CliRunner().invoke(cli, ["report", str(results), "--markdown", str(md), *args])
    assert r.exit_code == 0, r.output
    return md.read_text()


def _links(text):
    return re.findall(r"!\[[^\]]+\]\(([^)]+\.png)\)", text)


def test_charts_drawn_linked_and_valid(results_dir):
    for engine in ("mlx", "torch"):
        _bench(results_dir, engine)
        _bench(results_dir, engine, quantize="int4")
        _finetune(results_dir, engine)
        _mmlu(results_dir, engine, shots=0)
        _mmlu(results_dir, engine, shots=5)
        _speculate(results_dir, engine)
        _quality(results_dir, engine, "int8", 0.005)
        _quality(results_dir, engine, "int4", 0.9)
    _bench(results_dir, "torch", model=GGUF)

    text = _report(results_dir)
    links = _links(text)
    assert sorted(links) == sorted({
        "charts/bench-random-tinyllama-random.png", "charts/bench-gguf-smollm2-135m-q4-1-gguf.png",
        "charts/finetune-random-tinyllama-random.png", "charts/speculate-random-tinyllama-random.png",
        "charts/mmlu-random-tinyllama-random-0-shot.png", "charts/mmlu-random-tinyllama-random-5-shot.png",
        "charts/quality-tiny-tinyllama-tiny.png"})
    for link in links:
        assert (results_dir / link).read_bytes()[:8] == PNG_MAGIC
    # titles name the model, its weights' source and the machine
    assert "gguf:smollm2-135m (Q4_1 GGUF, dequantized) on " in text
    assert "random:tinyllama (random weights) on " in text
    # the source column
    assert "| engine | model | source | precision |" in text
    assert f"| torch | {GGUF} | Q4_1 GGUF | float16 |" in text
    assert "| mlx | random:tinyllama | random | float16 int4 |" in text


def test_no_chart_without_its_records(results_dir):
    _bench(results_dir, "mlx")
    _write(results_dir, "parity", "mlx,torch", {}, {"mean_kl": 0.0, "top1_agreement": 1.0})
    links = _links(_report(results_dir))
    assert links == ["charts/bench-random-tinyllama-random.png"]
    assert sorted(p.name for p in (results_dir / "charts").iterdir()) == ["bench-random-tinyllama-random.png"]


def test_newest_complete_record_per_series(results_dir):
    """Of several records for one series the newest complete one is drawn; an interrupted one draws nothing."""
    from billion.records.report import CHARTS, _groups
    from billion.records.store import read_records

    now = time.time()
    _bench(results_dir, "mlx", decode_tps=5.0, started=now - 60)
    _bench(results_dir, "mlx", decode_tps=7.0, started=now - 30)
    _bench(results_dir, "torch", decode_tps=6.0, started=now - 90)
    rec = make_record("finetune", "mlx", "random:tinyllama", {}, {}, started=now, status="interrupted",
                      extra={"history": [{"step": 1, "loss": 3.0}]})
    write_record(rec, results_dir)
    records = read_records([results_dir])
    bench, finetune = (next(c for c in CHARTS if c.task == task) for task in ("bench", "finetune"))
    groups = _groups(records, bench)
    assert list(groups) == [("random:tinyllama", "random")]
    assert {k: r["metrics"]["decode_tps"] for k, r in groups["random:tinyllama", "random"].items()} == \
        {("mlx", "float16"): 7.0, ("torch", "float16"): 6.0}
    assert _groups(records, finetune) == {}


def test_no_charts_flag(results_dir):
    _bench(results_dir, "mlx")
    text = _report(results_dir, "--no-charts")
    assert _links(text) == []
    assert not (results_dir / "charts").exists()


def test_a_record_holding_a_table_gets_it_rendered(results_dir):
    rows = [{"engine": "torch float32", "decode_tps": 8.5, "decode_vs_peer": 0.31},
            {"engine": "llama.cpp F32", "decode_tps": 27.4, "decode_vs_peer": 1.0}]
    path = _write(results_dir, "peer_bench", "torch,llama.cpp", {"runs": 3}, {"rows": rows, "median_of_runs": 3},
                  model=GGUF)
    text = _report(results_dir, "--no-charts")
    assert "| engine | decode_tps | decode_vs_peer |" in text
    assert "| torch float32 | 8.5 | 0.31 |" in text and "| llama.cpp F32 | 27.4 | 1 |" in text
    assert f"{path.name}:" in text


def test_precision_names_quantization_and_a_compiled_decode():
    from billion.records.report import precision

    assert precision({"config": {"dtype": "float32", "quantize": "int4"}}) == "float32 int4"
    assert precision({"config": {"dtype": "bfloat16", "compile": True}, "model_info": {"dtype": "bfloat16"}}) \
        == "bfloat16 compiled"
    assert precision({"config": {"dtype": None, "compile": False}}) == "-"
    # -b all --compile: MLX's record carries the option but its engine decoded uncompiled
    assert precision({"config": {"compile": True}, "model_info": {"dtype": "float32", "compiled": None}}) == "float32"
