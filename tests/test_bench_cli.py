"""`billion bench` through CliRunner, its records, and the error paths of loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import backends
from billion.cli import cli
from billion.records.store import read_records, validate

REPO = Path(__file__).resolve().parent.parent


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    return result


def test_bench_all_engines_writes_records_and_parity(results_dir):
    r = run("bench", "-m", "tiny:tinyllama", "-b", "all", "-p", "8", "-n", "8", "--runs", "2",
            "--results-dir", str(results_dir))
    assert r.exit_code == 0, r.output
    records = {rec["task"] + ":" + rec["backend"]: rec for rec in read_records([results_dir])}
    assert set(records) == {"bench:mlx", "bench:torch", "parity:mlx,torch"}
    for engine in ("mlx", "torch"):
        rec = records[f"bench:{engine}"]
        validate(rec)
        m = rec["metrics"]
        assert rec["status"] == "complete" and m["runs_completed"] == 2
        assert m["decode_tps"] > 0 and m["prefill_tps"] > 0 and m["ttft_s"] > 0
        assert m["decode_tps_min"] <= m["decode_tps"] <= m["decode_tps_max"]
        assert 0 < m["bandwidth_fraction"] and m["weight_gb"] > 0 and m["peak_memory_gb"] > 0
        assert rec["environment"]["versions"]["transformers"]
        assert all(len(run["tokens"]) == 8 for run in rec["runs"])
    assert records["bench:mlx"]["metrics"]["memory_source"] == "mx.get_peak_memory"
    assert records["bench:torch"]["metrics"]["memory_source"] == "process peak RSS"
    p = records["parity:mlx,torch"]["metrics"]
    assert p["top1_agreement"] == 1.0 and p["first_greedy_divergence"] is None
    assert p["max_abs_logit_diff"] < 1e-4 and p["positions"] == 16
    assert "ratios torch/mlx" in r.output and "parity mlx vs torch" in r.output
    # reports are rendered from the records alone
    md = results_dir / "README.md"
    assert run("report", str(results_dir), "--markdown", str(md)).exit_code == 0
    text = md.read_text()
    assert "## bench" in text and "## parity" in text and "| mlx | tiny:tinyllama | tiny | float32 |" in text


def test_ctrl_c_keeps_a_partial_record(results_dir, monkeypatch):
    import billion.tasks.bench as bench

    real, calls = bench.time_generation, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # warm-up, run 1, then Ctrl-C during run 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "time_generation", flaky)
    r = run("bench", "-m", "tiny:tinyllama", "-b", "torch", "-p", "4", "-n", "4", "--runs", "3",
            "--results-dir", str(results_dir))
    assert r.exit_code == 130
    [rec] = read_records([results_dir])
    assert rec["status"] == "interrupted" and rec["metrics"]["runs_completed"] == 1


def test_unknown_model_lists_aliases():
    r = run("bench", "-m", "gpt-17", "-b", "torch")
    assert r.exit_code == 1 and "known models: tinyllama" in r.output and "Traceback" not in r.output


def test_prompt_longer_than_context(results_dir):
    r = run("bench", "-m", "tiny:tinyllama", "-b", "torch", "-p", "600", "-n", "8", "--results-dir", str(results_dir))
    assert r.exit_code == 1 and "longer than the model's context of 512 tokens" in r.output


def test_bad_backend_and_device():
    assert "unknown backend 'jax'" in run("bench", "-m", "tiny:tinyllama", "-b", "jax").output
    r = run("bench", "-m", "tiny:tinyllama", "-b", "torch", "--device", "cuda")
    assert r.exit_code == 1 and "not available here" in r.output
    r = run("bench", "-m", "tiny:tinyllama", "-b", "mlx", "--device", "gpu")
    assert r.exit_code == 1 and "use --device cpu" in r.output


def test_engine_not_installed_names_install_command(monkeypatch):
    monkeypatch.setattr(backends, "_probe", lambda name: "ImportError: No module named 'mlx'" if name == "mlx" else None)
    r = run("bench", "-m", "tiny:tinyllama", "-b", "mlx")
    assert r.exit_code == 1 and 'pip install mlx-lm "mlx[cpu]"' in r.output
    # "all" is billion's own engines: the llama.cpp peer runs only when named
    assert backends.available() == ["torch", "llama.cpp"] and backends.engine_names("all") == ["torch"]


def test_model_too_big_is_refused_before_loading(monkeypatch):
    from backends import host

    monkeypatch.setattr(host, "available_memory_bytes", lambda: 10_000)
    r = run("bench", "-m", "tiny:tinyllama", "-b", "torch")
    assert r.exit_code == 1 and "needs about" in r.output and "available" in r.output


def _folder_with_config(tmp_path, tiny_folder, **changes):
    folder = tmp_path / "odd"
    shutil.copytree(tiny_folder("tinyllama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_architecture_an_engine_cannot_load(tmp_path, tiny_folder):
    folder = _folder_with_config(tmp_path, tiny_folder, model_type="bloom", architectures=["BloomForCausalLM"])
    r = run("bench", "-m", str(folder), "-b", "mlx")
    assert r.exit_code == 1 and "MLX engine" in r.output and "BloomForCausalLM" in r.output
    folder2 = _folder_with_config(tmp_path / "b", tiny_folder, model_type="nonesuch", architectures=["NoneSuch"])
    r = run("bench", "-m", str(folder2), "-b", "torch")
    assert r.exit_code == 1 and "torch engine" in r.output and "NoneSuch" in r.output


def test_pickle_only_folder_is_refused(tmp_path, tiny_folder):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder("tinyllama"), folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    r = run("bench", "-m", str(folder), "-b", "torch")
    assert r.exit_code == 1 and "no .safetensors weights" in r.output and "pickle" in r.output


def _cli_subprocess(args, env_extra, tmp_path):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "billion", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


def test_hub_alias_loads_from_local_hf_cache_offline(tmp_path, tiny_folder):
    """The download path, offline, against a Hugging Face cache layout."""
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--TinyLlama--TinyLlama-1.1B-Chat-v1.0"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_folder("tinyllama"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    args = ["bench", "-m", "tinyllama", "-b", "torch", "-p", "4", "-n", "4", "--runs", "1", "--warmup", "0",
            "--results-dir", str(tmp_path / "res")]
    ok = _cli_subprocess(args, {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert ok.returncode == 0, ok.stderr
    [rec] = read_records([tmp_path / "res"])
    assert rec["model"] == "tinyllama" and rec["model_info"]["path"].endswith(commit)

    missing = _cli_subprocess(args, {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert missing.returncode == 1
    assert "not in the local Hugging Face cache" in missing.stderr and "random:tinyllama" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_help_works_without_either_engine(tmp_path):
    code = ("import sys; sys.modules['mlx'] = sys.modules['torch'] = None; sys.argv = ['billion', '--help'];"
            "from billion.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "bench" in out.stdout


def test_models_command_lists_registry():
    r = run("models")
    assert r.exit_code == 0
    for name in ("tinyllama", "Llama-3.2-1B-Instruct", "stablelm-2-1_6b-chat", "pythia-1b"):
        assert name in r.output


class _StubEngine:
    """Fixed bytes and bandwidth: bench's arithmetic checked exactly."""

    def __init__(self, bandwidth_gbs):
        from backends.types import MemoryStats, ModelInfo

        self._bw = bandwidth_gbs
        self._info = ModelInfo(backend="stub", path="-", architecture="-", model_type="-", parameters=10,
                               dtype="float32", device="cpu", weight_bytes=2 * 10**9,
                               decode_bytes_per_token=10**9, vocab_size=8, context_length=64)
        self._mem = MemoryStats(1, 3 * 10**9, "stub")

    def info(self):
        return self._info

    def memory(self):
        return self._mem

    def memory_bandwidth(self):
        return self._bw, "stub"


@pytest.mark.parametrize("bandwidth,fraction", [(20.0, 0.5), (5.0, None)])
def test_bench_arithmetic_and_a_ceiling_that_holds(bandwidth, fraction):
    from billion.tasks.bench import BenchConfig, BenchResult, RunTiming, summarise

    runs = [RunTiming(ttft_s=t, prefill_tps=p, decode_tps=d, tokens=[1, 2])
            for t, p, d in ((0.2, 100.0, 9.0), (0.1, 300.0, 10.0), (0.3, 200.0, 11.0))]
    m = summarise(_StubEngine(bandwidth), BenchResult(BenchConfig(), runs))
    assert (m["ttft_s"], m["prefill_tps"], m["decode_tps"]) == (0.2, 200.0, 10.0)  # medians
    assert (m["decode_tps_min"], m["decode_tps_max"]) == (9.0, 11.0)
    assert m["weight_gb"] == 2.0 and m["decode_gb_per_token"] == 1.0 and m["peak_memory_gb"] == 3.0
    # 1 GB read per token: the ceiling is bandwidth / 1 GB tokens per second
    assert m["bandwidth_ceiling_tps"] == bandwidth
    assert m.get("bandwidth_fraction") == fraction
    # 10 tok/s reads 10 GB/s: above a 5 GB/s "ceiling", so the probe was wrong, and said so
    assert ("bandwidth_fault" in m) == (fraction is None)


def test_bench_resolves_the_model_spec_once(tiny_folder, results_dir, monkeypatch):
    import billion.loading as loading

    seen = []
    real = loading.model_folder
    monkeypatch.setattr(loading, "model_folder", lambda spec, *a, **k: seen.append(spec.text) or real(spec, *a, **k))
    result = CliRunner().invoke(cli, ["bench", "-b", "all", "-m", "tiny:tinyllama", "--device", "cpu",
                                      "--draft", "layers:1", "-p", "4", "-n", "3", "--runs", "1", "--warmup", "0",
                                      "--no-parity", "--results-dir", str(results_dir)])
    assert result.exit_code == 0, result.output
    assert seen.count("tiny:tinyllama") == 1  # not once per engine, nor again for the draft or the records
