"""`billion serve` against careless and hostile clients (issue 23, items 1 and 2): a real server
process gets requests of each class, each answered with a 4xx in OpenAI's error shape (never a
500, never an exception's name), and a good request is answered correctly after them; an internal
error's answer carries a request id and no exception text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx


@pytest.fixture(scope="module")
def served(tiny_folder):
    folder = tiny_folder("tinyllama")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "billion", "serve", "-m", str(folder), "-b", "torch", "--device",
                             "cpu", "--dtype", "float32", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, seen, deadline = None, [], time.time() + 90
        while url is None:
            line = proc.stdout.readline()
            assert line and time.time() < deadline, "".join(seen)
            seen.append(line)
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
        yield folder.name, url, log
    finally:
        proc.terminate()
        proc.wait(20)


def post(url, body, raw=False, path="/v1/completions"):
    return httpx.post(url + path, content=body if raw else None, json=None if raw else body,
                      headers={"Content-Type": "application/json"}, timeout=30)


def test_sampling_settings_that_would_overflow(served):
    model, url, _ = served
    base = {"model": model, "prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True}
    greedy = post(url, {**base, "temperature": 0}).json()["choices"][0]["text"]
    # a vanishing temperature is greedy (it used to overflow the distribution to NaN: a 500)
    for t in (1e-30, 5e-324, 1e-6):
        r = post(url, {**base, "temperature": t})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (t, r.text)
    # penalties out of range are refused, naming the field
    for field, value in (("repetition_penalty", 1e-30), ("repetition_penalty", 1e9), ("presence_penalty", 1e9),
                         ("frequency_penalty", -1e9)):
        r = post(url, {**base, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    # the most a legal setting can do still samples inside the vocabulary
    r = post(url, {**base, "temperature": 2.0, "repetition_penalty": 0.01, "presence_penalty": 2,
                   "frequency_penalty": -2, "seed": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6


def test_client_mistakes_are_4xx_in_openais_shape(served):
    model, url, log = served
    ok = {"model": model, "prompt": "hi", "max_tokens": 2}
    cases = [
        ({**ok, "seed": -1}, "seed"),
        ({**ok, "seed": 2**70}, "seed"),
        (b'{"model": "%s", "prompt": "hi", "max_tokens": 1' % model.encode() + b"0" * 5000 + b"}", None),
        (b"[" * 100000 + b"]" * 100000, None),
        (b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % model.encode(), None),
        (b'{"model": "%s", "prompt": "hi", "temperature": Infinity}' % model.encode(), None),
        (b"\xff\xfe{}", None),
        ({**ok, "response_format": {"type": "json_object"}}, "response_format"),
        ({**ok, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
         "response_format"),
        ({**ok, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({**ok, "tool_choice": "required"}, "tool_choice"),
        ({**ok, "logprobs": 3}, "logprobs"),
        ({**ok, "logit_bias": {"1": 5}}, "logit_bias"),
        ({**ok, "n": 2}, "n"),
        ({**ok, "best_of": 3}, "best_of"),
    ]
    for body, param in cases:
        r = post(url, body, raw=isinstance(body, bytes))
        assert r.status_code == 400, (str(body)[:80], r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        if param:
            assert err["param"] == param and param in err["message"], err
        assert "Traceback" not in r.text and "Error:" not in err["message"][:40]
        assert r.headers.get("x-request-id")
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = post(url, {**chat, "response_format": {"type": "json_object"}}, path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    # their "off" values are fine, as is vLLM's top_k = -1
    for body in ({**ok, "response_format": {"type": "text"}}, {**ok, "logprobs": None, "tools": []},
                 {**ok, "top_k": -1}, {**ok, "tool_choice": "none"}):
        r = post(url, body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, (body, r.text)
    assert not any("Traceback" in line for line in log)  # no client mistake reached the log as a crash


def test_an_internal_error_names_the_request_not_the_exception(tiny_model):
    from billion.server.app import create_app
    from tests.test_serve import Server

    backend = tiny_model("torch")
    srv = Server(create_app({"tiny": backend}))
    try:
        real = backend.tokenize

        def broken(*a, **kw):  # an engine failing where no client mistake can reach
            raise RuntimeError("secret internal detail")

        backend.tokenize = broken
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                       timeout=30)
        backend.tokenize = real
        assert r.status_code == 500
        rid = r.headers["x-request-id"]
        assert rid in r.json()["error"]["message"]
        assert "secret" not in r.text and "RuntimeError" not in r.text
        ok = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                        timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    finally:
        backend.tokenize = real
        srv.stop()
