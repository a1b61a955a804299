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
    from billion.records.report import CHARTS, groups
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
    found = groups(records, bench)
    assert list(found) == [("random:tinyllama", "random")]
    assert {k: r["metrics"]["decode_tps"] for k, r in found["random:tinyllama", "random"].items()} == \
        {("mlx", "float16"): 7.0, ("torch", "float16"): 6.0}
    assert groups(records, finetune) == {}


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


# ---- bench --batch: the bench_batch table and chart ----

def _batch(results, backend, size, tps, *, started, chip=None, status="complete", metrics_size=True, **config):
    from billion.records.store import environment

    metrics = {"aggregate_decode_tps": tps, "per_sequence_decode_tps": tps / size, "ttft_s": 0.05 * size,
               "prefill_tps": 500.0, "peak_memory_gb": 1.5}
    if metrics_size:
        metrics["batch_size"] = size
    extra = {"model_source": GGUF_SOURCE}
    if chip:
        extra["environment"] = {**environment(), "chip": chip}
    rec = make_record("bench_batch", backend, GGUF, {"dtype": "float32", "quantize": None, "batch_size": size,
                                                     **config}, metrics, started=started, status=status, extra=extra)
    return write_record(rec, results)


def test_batch_table_and_chart(results_dir):
    from billion.records.store import _slug, environment

    now = time.time()
    for i, size in enumerate((1, 2, 4, 8)):
        _batch(results_dir, "torch", size, 15.0 * size, started=now - 100 + i)
        _batch(results_dir, "mlx", size, 4.0 * size, started=now - 50 + i, dtype="bfloat16")
    _batch(results_dir, "torch", 16, 150.0, started=now - 10, metrics_size=False)  # batch size in config only

    text = _report(results_dir)
    link = f"charts/bench_batch-gguf-smollm2-135m-q4-1-gguf-{_slug(str(environment()['chip']))}.png"
    assert link in _links(text)
    assert (results_dir / link).read_bytes()[:8] == PNG_MAGIC
    assert "Aggregate decode tok/s against batch size: gguf:smollm2-135m (Q4_1 GGUF, dequantized) on " in text
    section = text.split("## bench_batch", 1)[1].split("\n## ", 1)[0]
    assert ("| started | engine | model | source | precision | batch_size | prefill_tps | ttft_s | "
            "aggregate_decode_tps | per_sequence_decode_tps | peak_memory_gb | status |") in section
    table = [line for line in section.splitlines() if line.startswith("| 20")]
    assert len(table) == 9
    assert any(f"| torch | {GGUF} | Q4_1 GGUF | float32 | 8 | 500 | 0.4 | 120 | 15 | 1.5 | complete |" in row
               for row in table)
    assert any(f"| mlx | {GGUF} | Q4_1 GGUF | bfloat16 | 4 | 500 | 0.2 | 16 | 4 | 1.5 | complete |" in row
               for row in table)
    assert any(f"| torch | {GGUF} | Q4_1 GGUF | float32 | 16 | 500 | 0.8 | 150 |" in row for row in table)


def test_batch_chart_newest_complete_per_engine_precision_and_size_per_machine(results_dir):
    from billion.records.report import CHARTS, groups, charts
    from billion.records.store import read_records

    now = time.time()
    _batch(results_dir, "torch", 1, 10.0, started=now - 90)
    _batch(results_dir, "torch", 1, 12.0, started=now - 80)  # newer: drawn
    _batch(results_dir, "torch", 1, 99.0, started=now - 70, status="interrupted")  # not complete: not drawn
    _batch(results_dir, "torch", 2, 18.0, started=now - 60)
    _batch(results_dir, "torch", 2, 30.0, started=now - 50, quantize="int8")
    _batch(results_dir, "mlx", 1, 3.0, started=now - 40, chip="Apple M2")  # another machine, another chart
    _batch(results_dir, "torch", 4, 0.0, started=now - 30)  # nothing measured: not drawn
    records = read_records([results_dir])
    batch = next(c for c in CHARTS if c.task == "bench_batch")
    found = groups(records, batch)
    here = next(k for k in found if k[2] != "Apple M2")
    assert sorted(found) == sorted([here, (GGUF, "Q4_1 GGUF", "Apple M2")])
    assert {k: r["metrics"]["aggregate_decode_tps"] for k, r in found[here].items()} == \
        {("torch", "float32", 1): 12.0, ("torch", "float32", 2): 18.0, ("torch", "float32 int8", 2): 30.0}
    drawn = charts(records, results_dir)["bench_batch"]
    assert len(drawn) == 2 and all((results_dir / link).read_bytes()[:8] == PNG_MAGIC for _, link in drawn)
    assert any(title.endswith("on Apple M2") for title, _ in drawn)


def _drawn(chart_task: str, chosen: dict):
    """The chart drawn as _save draws it: (figure, axes) after rendering."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from billion.records.report import CHARTS

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    next(c for c in CHARTS if c.task == chart_task).draw(fig, ax, chosen)
    ax.set_title("title\nsubject", fontsize=10)
    fig.canvas.draw()
    return fig, ax


def _overlapping(boxes):
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
            if box_a.width and box_b.width and box_a.overlaps(box_b)]


def test_batch_chart_lines_log2_ticks_and_legend_outside_the_data():
    rec = lambda tps: {"metrics": {"aggregate_decode_tps": tps}}  # noqa: E731
    chosen = {(engine, prec, size): rec(base * size) for engine, prec, base in
              (("torch", "float32", 10.0), ("torch", "bfloat16", 14.0), ("mlx", "float32 int4", 1.0),
               ("llama.cpp", "F16", 40.0)) for size in (1, 2, 4, 8, 16)}
    fig, ax = _drawn("bench_batch", chosen)
    assert sorted(line.get_label() for line in ax.get_lines()) == \
        ["llama.cpp F16", "mlx float32 int4", "torch bfloat16", "torch float32"]
    assert all(list(line.get_xdata()) == [1, 2, 4, 8, 16] for line in ax.get_lines())
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "16"]
    renderer = fig.canvas.get_renderer()
    assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


# ---- precision: llama.cpp's types grouped with billion's ----

def test_llamacpp_precision_is_its_gguf_type():
    from billion.records.report import precision

    def llamacpp(dtype, quantize=None, quantization=None):
        info = {"dtype": dtype, "quantization": quantization} if quantization or dtype else {}
        return precision({"backend": "llama.cpp", "config": {"dtype": dtype, "quantize": quantize},
                          "model_info": info})

    assert llamacpp("float32") == "F32"
    assert llamacpp("float16") == "F16"
    assert llamacpp("bfloat16") == "BF16"
    assert llamacpp("float32", "int8", "llama.cpp Q8_0 (blocks of 32 weights; --group-size does not apply)") == "Q8_0"
    assert llamacpp(None, "int4") == "Q4_0"  # no model_info: from what was asked
    assert llamacpp("F16") == "F16"  # a record already in llama.cpp's names
    assert precision({"backend": "torch", "config": {"dtype": "float32", "quantize": "int8"}}) == "float32 int8"


def test_precision_groups_put_comparable_precisions_together():
    from billion.records.report import precision_group

    groups = {
        "32-bit float": ["float32", "float32 compiled", "F32"],
        "16-bit float": ["bfloat16", "float16", "bfloat16 compiled", "F16", "BF16"],
        "int8 weights": ["float32 int8", "bfloat16 int8 compiled", "float32 int8-dynamic", "bnb-int8", "Q8_0", "int8"],
        "int4 weights": ["float32 int4", "float32 int4 compiled", "bnb-int4", "Q4_0", "Q4_1"],
    }
    for group, precisions in groups.items():
        assert {p: precision_group(p) for p in precisions} == {p: group for p in precisions}
    assert precision_group("-") == "-"


def test_bench_chart_groups_llamacpp_with_billion_and_labels_do_not_overlap():
    def rec(tps, fraction=0.2):
        return {"metrics": {"decode_tps": tps, "bandwidth_fraction": fraction}}

    chosen = {("llama.cpp", "F32"): rec(27.0), ("llama.cpp", "F16"): rec(39.0), ("llama.cpp", "Q8_0"): rec(52.0),
              ("llama.cpp", "Q4_0"): rec(53.0), ("mlx", "bfloat16"): rec(3.6), ("mlx", "float32"): rec(4.2),
              ("mlx", "float32 int4"): rec(4.9, 0.025), ("torch", "bfloat16"): rec(16.0),
              ("torch", "bfloat16 compiled"): rec(21.0), ("torch", "bfloat16 int8 compiled"): rec(18.8),
              ("torch", "float32"): rec(25.7), ("torch", "float32 compiled"): rec(13.4),
              ("torch", "float32 int8"): rec(4.7, 0.03), ("torch", "float32 int8-dynamic"): rec(15.0, None),
              ("torch", "float32 int4 compiled"): rec(4.6, 0.018)}
    fig, ax = _drawn("bench", chosen)
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "32-bit float", "llama.cpp F32", "mlx float32", "torch float32", "torch float32 compiled",
        "16-bit float", "llama.cpp F16", "mlx bfloat16", "torch bfloat16", "torch bfloat16 compiled",
        "int8 weights", "llama.cpp Q8_0", "torch bfloat16 int8 compiled", "torch float32 int8",
        "torch float32 int8-dynamic",
        "int4 weights", "llama.cpp Q4_0", "mlx float32 int4", "torch float32 int4 compiled"]
    texts = [t.get_text() for t in ax.texts]
    assert "52 tok/s, 20.0% of ceiling" in texts and "15 tok/s" in texts  # no ceiling: no share
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in [*ax.get_yticklabels(), *ax.texts,
                                                                     ax.xaxis.label, ax.title]]
    boxes += [("legend", legend.get_window_extent(renderer)) for legend in fig.legends]
    assert _overlapping(boxes) == []
    figure = fig.bbox
    assert all(figure.x0 <= box.x0 and box.x1 <= figure.x1 + 1 for _, box in boxes)  # nothing cut off
    assert all(not box.overlaps(ax.get_window_extent(renderer)) for t, box in boxes
               if t.endswith("of ceiling"))  # the figures stand beside the bars, not on them
