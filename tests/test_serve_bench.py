"""`billion load`: against a stub server whose delays are known (so a wrong TTFT, ITL or token count
shows), at a Poisson rate, against a real `billion serve`, and its one-line errors."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from click.testing import CliRunner

from billion.cli import cli
from billion.records.store import read_records
from billion.tasks import serve_bench as task

FIRST_S = 0.05  # the stub's delay before its first token
TOKEN_S = 0.02  # and before each next one


def stub_app(bodies: list):
    """/v1/models and a streamed /v1/completions: the first event FIRST_S after the request, then
    one every TOKEN_S per token it carries. Models: "stub" (one token an event, a usage chunk),
    "stub-pairs" (two tokens an event), "stub-nousage" (no usage chunk)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "stub"}
                                                        for m in ("stub", "stub-pairs", "stub-nousage")]})

    async def completions(request):
        body = await request.json()
        bodies.append(body)
        n, model = body["max_tokens"], body["model"]
        per_event = 2 if model == "stub-pairs" else 1

        async def events():
            await asyncio.sleep(FIRST_S)
            sent = 0
            while sent < n:
                k = min(per_event, n - sent)
                if sent:
                    await asyncio.sleep(TOKEN_S * k)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': ' tok' * k}]})}\n\n"
                sent += k
            if model != "stub-nousage":
                usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture(scope="module")
def stub():
    """The stub on 127.0.0.1 and a free port, in a thread: (url, the request bodies it received)."""
    import uvicorn

    bodies: list = []
    server = uvicorn.Server(uvicorn.Config(stub_app(bodies), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the stub did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", bodies
    server.should_exit = True
    thread.join(10)


def load(*args):
    return CliRunner().invoke(cli, ["load", *map(str, args)])


def records_of(results_dir) -> list[dict]:
    return sorted(read_records([results_dir]), key=lambda r: r["started_at"])


def test_stub_delays_measured_and_tokens_exact(stub, results_dir):
    url, bodies = stub
    bodies.clear()
    r = load(f"{url}#stub", "--concurrency", "1,4", "--requests", 8, "--prompt-len", "5-9", "--output-len", 10,
             "--slo", "ttft=10,e2el=0.001", "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    recs = records_of(results_dir)
    assert [rec["config"]["concurrency"] for rec in recs] == [1, 4]
    for rec in recs:
        m = rec["metrics"]
        assert rec["task"] == "serve_bench" and rec["backend"] == "stub" and rec["model"] == "stub"
        assert m["requests"] == m["requests_ok"] == 8 and m["requests_short"] == 0
        assert m["output_tokens"] == m["output_tokens_asked"] == 80 and m["tokens_from_usage"] == 8
        assert m["tokens_per_event"] == 1.0
        # the stub's delays, measured: nothing queues in it, so concurrency 4 changes neither
        assert FIRST_S <= m["ttft_p50_s"] < FIRST_S + 0.03
        assert 0.7 * TOKEN_S <= m["itl_p50_s"] <= 1.3 * TOKEN_S
        assert 0.7 * TOKEN_S <= m["tpot_p50_s"] <= 1.3 * TOKEN_S
        assert FIRST_S + 9 * TOKEN_S <= m["e2e_p50_s"] < FIRST_S + 9 * TOKEN_S + 0.1
        # aggregate throughput follows from the wall time, which concurrency 4 divides by about 4
        assert m["output_tps"] == pytest.approx(80 / m["wall_s"])
        # goodput: every request meets ttft=10 s, none e2el=1 ms
        assert m["requests_good"] == 0 and m["goodput_rps"] == 0
        assert len(rec["requests"]) == 8 and all(q["output_tokens"] == 10 for q in rec["requests"])
    assert recs[1]["metrics"]["wall_s"] < recs[0]["metrics"]["wall_s"] / 2.5
    # what the server was sent: streamed, usage asked for, EOS ignored, the asked lengths
    timed = bodies[1:]  # the first is the untimed probe
    assert len(timed) == 16
    for body in timed:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["max_tokens"] == 10 and body["model"] == "stub"
        assert 5 <= len(body["prompt"].split()) <= 9
    assert "TTFT p50" in r.output and "stub" in r.output


def test_a_multi_token_event_is_one_itl_gap_and_tokens_come_from_usage_or_events(stub, results_dir):
    url, _ = stub
    r = load(f"pairs={url}#stub-pairs", f"{url}#stub-nousage", "-c", 2, "--requests", 4, "--prompt-len", 4,
             "--output-len", 10, "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    recs = {rec["backend"]: rec["metrics"] for rec in records_of(results_dir)}
    pairs, nousage = recs["pairs"], recs["stub"]
    # two tokens an event: one gap of 2 x TOKEN_S, not two of TOKEN_S; TPOT is per token
    assert pairs["tokens_per_event"] == 2.0 and pairs["output_tokens"] == 40
    assert 0.7 * 2 * TOKEN_S <= pairs["itl_p50_s"] <= 1.3 * 2 * TOKEN_S
    assert pairs["tpot_p50_s"] < 0.7 * pairs["itl_p50_s"]
    # no usage chunk: the content events are counted
    assert nousage["tokens_from_usage"] == 0 and nousage["output_tokens"] == 40


def test_poisson_rate_point(stub, results_dir):
    url, bodies = stub
    bodies.clear()
    rate, count, seed = 20.0, 20, 7
    r = load(f"{url}#stub", "--rate", rate, "--requests", count, "--seed", seed, "--prompt-len", 3,
             "--output-len", 2, "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    (rec,) = records_of(results_dir)
    m = rec["metrics"]
    assert rec["config"]["request_rate"] == rate and "concurrency" not in rec["config"]
    assert m["requests"] == m["requests_ok"] == count and len(bodies) == count + 1  # + the probe
    schedule = task.poisson_offsets(count, rate, seed)
    assert task.poisson_offsets(count, rate, seed) == schedule  # seeded
    sent = [q["sent_s"] for q in rec["requests"]]
    assert all(abs(s - at) < 0.05 for s, at in zip(sent, schedule))  # each left at its arrival time
    assert m["send_rate_rps"] == pytest.approx((count - 1) / schedule[-1], rel=0.1)
    assert rate / 2 < m["send_rate_rps"] < rate * 2


def test_poisson_gaps_are_exponential_with_the_rate():
    offsets = task.poisson_offsets(4001, 5.0, 0)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0 and min(gaps) > 0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 5.0, rel=0.05)
    # exponential: P(gap > mean) = 1/e
    assert sum(g > 0.2 for g in gaps) / len(gaps) == pytest.approx(0.368, abs=0.03)


def test_a_point_stops_at_its_timeout(stub, results_dir):
    url, _ = stub
    started = time.time()
    r = load(f"{url}#stub", "-c", 2, "--requests", 4, "--output-len", 100, "--timeout", 0.5,
             "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    assert time.time() - started < 10
    (rec,) = records_of(results_dir)
    m = rec["metrics"]
    assert m["requests_ok"] == 0 and m["requests_failed"] == 4 and m["wall_s"] < 1.0
    assert any("timeout" in e for e in m["errors"])


def test_billion_serve_sweep_records_and_report(tiny_folder, results_dir, tmp_path):
    from billion.records.html import page
    from tests.servers import serve_process

    try:
        import httpx
    except ImportError:
        import httpx2 as httpx

    with serve_process(tiny_folder("tinyllama")) as served:
        ids = [m["id"] for m in httpx.get(f"{served.url}/v1/models").json()["data"]]
        model = next(i for i in ids if i.endswith("@torch"))
        r = load(f"{served.url}#{model}", "-c", "1,2", "--requests", 3, "--prompt-len", 6, "--output-len", 8,
                 "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    recs = records_of(results_dir)
    assert [(rec["backend"], rec["config"]["concurrency"]) for rec in recs] == [("torch", 1), ("torch", 2)]
    for rec in recs:
        m = rec["metrics"]
        assert rec["model"] == model.rpartition("@")[0] and rec["config"]["served_model"] == model
        assert m["requests_ok"] == 3 and m["output_tokens"] == 24 and m["requests_short"] == 0
        assert m["tokens_from_usage"] == 3 and all(q["output_tokens"] == 8 for q in rec["requests"])
        assert m["ttft_p50_s"] > 0 and m["output_tps"] > 0
    md = tmp_path / "report" / "README.md"
    r = CliRunner().invoke(cli, ["report", str(results_dir), "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    text = md.read_text()
    assert "## serve_bench" in text and "| torch |" in text
    charts = [line for line in text.splitlines() if line.startswith("![") and "serve_bench" in line]
    assert len(charts) == 2 and any("Output tok/s" in c for c in charts) and any("TTFT" in c for c in charts)
    html = page(read_records([results_dir]))
    assert 'id="serve_bench"' in html and html.count("<figure") == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args,message", [
    (["http://example.com:8080"], "only loopback servers"),
    (["http://10.1.2.3:8080"], "only loopback servers"),
    (["ftp://127.0.0.1:8080"], "not an http:// URL"),
    (["http://127.0.0.1:8080", "--slo", "ttft=abc"], "--slo: ttft='abc' is not a number"),
    (["http://127.0.0.1:8080", "--slo", "itl=0.1"], "KEY one of ttft, tpot, e2el"),
    (["http://127.0.0.1:8080", "--concurrency", "1,x"], "--concurrency: expected a comma list"),
    (["http://127.0.0.1:8080", "--prompt-len", "9-3"], "--prompt-len: lengths are at least 1"),
])
def test_bad_input_is_one_line(args, message, results_dir):
    r = load(*args, "--results-dir", results_dir)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1 and message in r.output, r.output
    assert not results_dir.exists()


def test_unreachable_server_and_unchosen_model(stub, results_dir):
    port = free_port()
    r = load(f"http://127.0.0.1:{port}", "--results-dir", results_dir)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"cannot reach http://127.0.0.1:{port}" in r.output
    url, _ = stub
    r = load(url, "--results-dir", results_dir)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "serves 3 models (stub, stub-pairs, stub-nousage)" in r.output and f"{url}#MODEL" in r.output
    r = load(f"{url}#stub", f"{url}#stub-pairs", "--results-dir", results_dir)
    assert r.exit_code == 1 and "both called 'stub'" in r.output, r.output
    assert not results_dir.exists()


@pytest.mark.parametrize("content,message", [
    ("{not json", "not a JSON file"),
    ('{"conversations": []}', "expected a JSON list"),
    ('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, {"conv": 1}]',
     "entry 1: expected"),
    ('[{"conversations": [{"from": "human", "value": 3}]}]', "entry 0: expected"),
    ('[{"conversations": [{"from": "gpt", "value": "alone"}]}]', "no conversation has a human turn"),
])
def test_bad_dataset_names_the_file_and_entry(content, message, tmp_path, results_dir):
    path = tmp_path / "share.json"
    path.write_text(content)
    r = load("http://127.0.0.1:9", "--dataset", path, "--results-dir", results_dir)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"{path}: " in r.output and message in r.output, r.output
    r = load("http://127.0.0.1:9", "--dataset", tmp_path / "missing.json", "--results-dir", results_dir)
    assert r.exit_code == 1 and "missing.json: cannot read it" in r.output, r.output


def test_sharegpt_prompts_and_word_lengths(stub, tmp_path, results_dir):
    conversations = [{"conversations": [{"from": "system", "value": "be brief"},
                                        {"from": "human", "value": f"question {i}"},
                                        {"from": "gpt", "value": " ".join(["w"] * (i + 2))}]} for i in range(3)]
    conversations.append({"conversations": [{"from": "gpt", "value": "no question"}]})  # skipped
    path = tmp_path / "share.json"
    path.write_text(json.dumps(conversations))
    assert sorted(task.load_sharegpt(path)) == [("question 0", 2), ("question 1", 3), ("question 2", 4)]
    url, bodies = stub
    bodies.clear()
    r = load(f"{url}#stub", "-c", 2, "--requests", 6, "--dataset", path, "--results-dir", results_dir)
    assert r.exit_code == 0, r.output
    asked = sorted((b["prompt"], b["max_tokens"]) for b in bodies[1:])
    assert asked == sorted([("question 0", 2), ("question 1", 3), ("question 2", 4)] * 2)  # cycled
    (rec,) = records_of(results_dir)
    assert rec["metrics"]["output_tokens"] == 18 and "share.json" in rec["config"]["workload"]


def test_targets_parse():
    assert task.parse_target("http://127.0.0.1:8080/v1/") == task.Target("http://127.0.0.1:8080")
    assert task.parse_target("a=http://localhost:1#m@torch") == task.Target("http://localhost:1", "m@torch", "a")
    assert task.parse_target("http://[::1]:8000#x") == task.Target("http://[::1]:8000", "x")
    assert len(task.parse_targets(["http://127.0.0.1:1#a,http://127.0.0.1:1#b", "http://127.0.0.1:2"])) == 3
    assert task.split_engine("gguf:smollm2-135m@mlx") == ("gguf:smollm2-135m", "mlx")
    assert task.split_engine("user@example/model") == ("user@example/model", None)


def test_report_puts_every_server_of_a_workload_on_one_chart(results_dir):
    """billion -b all's two engines and a llama-server with its own model id share a chart when they
    ran the same workload; a rate sweep and another workload get charts of their own."""
    from billion.records.report import CHARTS, figure, groups
    from billion.records.store import make_record, write_record

    def write(backend, model, load, workload="completions, w", kind="concurrency", tps=10.0):
        metrics = {"output_tps": tps * load, "ttft_p50_s": 0.1 * load, "ttft_p99_s": 0.2 * load}
        write_record(make_record("serve_bench", backend, model, {kind: load, "workload": workload}, metrics,
                                 started=time.time()), results_dir)

    for load in (1, 2, 4):
        write("torch", "gguf:smollm2-135m", load)
        write("mlx", "gguf:smollm2-135m", load)
        write("llamacpp", "/models/smollm2.gguf", load)
    write("torch", "gguf:smollm2-135m", 1, kind="request_rate")
    write("torch", "gguf:smollm2-135m", 1, workload="chat, w")
    tps = next(c for c in CHARTS if c.task == "serve_bench" and c.name == "tps")
    found = groups(read_records([results_dir]), tps)
    assert len(found) == 3
    (key, chosen), = [(k, v) for k, v in found.items() if k[0] == "completions, w" and k[-1] == "concurrency"]
    assert {(b, load) for b, _, load in chosen} == {(b, n) for b in ("torch", "mlx", "llamacpp") for n in (1, 2, 4)}
    fig, title = figure(tps, chosen)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert sorted(labels) == ["llamacpp", "mlx", "torch"]  # a line per server; the title names the models
    assert "gguf:smollm2-135m" in title and "smollm2.gguf" in title and "concurrency" in title
