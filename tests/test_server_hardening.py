"""`billion serve` against careless and hostile clients (issue 23, items 1 and 2): a real server
process gets requests of each class, each answered with a 4xx in OpenAI's error shape (never a
500, never an exception's name), and a good request is answered correctly after them; an internal
error's answer carries a request id and no exception text."""

from __future__ import annotations

import threading
import time

import pytest

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx

from tests.servers import serve_process


@pytest.fixture(scope="module")
def served(tiny_folder):
    folder = tiny_folder("tinyllama")
    with serve_process(folder) as served:
        yield folder.name, served.url, served.log


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
        ({**ok, "response_format": {"type": "yaml"}}, "response_format"),
        ({**ok, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({**ok, "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
         "response_format"),
        ({**ok, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({**ok, "tool_choice": "required"}, "tool_choice"),
        ({**ok, "top_logprobs": 2}, "top_logprobs"),
        ({**ok, "logprobs": 9}, "logprobs"),
        ({**ok, "response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
        ({**ok, "logit_bias": {"1": 5}}, "logit_bias"),
        ({**ok, "n": 17}, "n"),
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
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for body, param in (({**chat, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}},
                         "tools"),  # a function that is not among the tools
                        ({**chat, "top_logprobs": 2}, "top_logprobs"),
                        ({**chat, "logprobs": "yes please"}, "logprobs"),
                        ({**chat, "tools": [tool], "response_format": {"type": "json_object"}}, "response_format"),
                        # content null (or missing) as OpenAI answers it: only an assistant calling tools may
                        ({**chat, "messages": [{"role": "user", "content": None}]}, "messages.0"),
                        ({**chat, "messages": [{"role": "system", "content": "s"}, {"role": "user"}]}, "messages.1"),
                        ({**chat, "messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": None}]}, "messages.1")):
        r = post(url, body, path="/v1/chat/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    called = {**chat, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}, {"role": "user", "content": "and?"}]}
    assert post(url, called, path="/v1/chat/completions").status_code == 200
    # the tiny model's template renders no tools: the generic format describes them and constrains the reply
    r = post(url, {**chat, "tools": [tool], "max_tokens": 4}, path="/v1/chat/completions")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith('{"'), r.text
    # their "off" values are fine, as is vLLM's top_k = -1
    for body in ({**ok, "response_format": {"type": "text"}}, {**ok, "logprobs": None, "tools": []},
                 {**ok, "top_k": -1}, {**ok, "tool_choice": "none"}):
        r = post(url, body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, (body, r.text)
    for body in ({**chat, "logprobs": None, "tools": None, "tool_choice": None}, {**chat, "logprobs": False}):
        r = post(url, body, path="/v1/chat/completions")
        assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, (body, r.text)
    assert not any("Traceback" in line for line in log)  # no client mistake reached the log as a crash


def test_an_internal_error_names_the_request_not_the_exception(tiny_model):
    from billion.server.app import create_app
    from tests.test_serve import Server

    srv = Server(create_app({"tiny": tiny_model("torch")}))
    backend = srv.app.state.engines["tiny"].prep  # what requests are tokenized with
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


@pytest.fixture(scope="module")
def guarded(tiny_model):
    """An in-thread server with API keys, small limits and a short request timeout."""
    from billion.server.access import Access
    from billion.server.app import create_app
    from billion.server.limits import Limits
    from tests.test_serve import Server

    limits = Limits(max_body_bytes=2 * 2**20, max_prompt_tokens=200, max_tokens=5, max_messages=3,
                    max_stop_length=8, request_timeout_s=0.1)
    srv = Server(create_app({"tiny": tiny_model("torch")}, limits=limits,
                            access=Access(api_keys=("k1", "k2"), allowed_origins=("http://app.example",))))
    yield srv
    srv.stop()


def call(srv, body, key="k1", path="/v1/completions", **headers):
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.url + path, json=body, headers={**auth, **headers}, timeout=30)


def test_keys_names_and_json_bodies(guarded):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert call(guarded, body).status_code == 200 and call(guarded, body, key="k2").status_code == 200
    for key in (None, "k3", "k", "k1k1", ""):
        r = call(guarded, body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", key
    assert httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(guarded.url + "/health").status_code == 200  # outside /v1: no key
    # Anthropic's header works as well; a wrong key on /v1/messages is refused in Anthropic's shape
    messages = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    assert call(guarded, messages, key=None, path="/v1/messages", **{"x-api-key": "k2"}).status_code == 200
    r = call(guarded, messages, key=None, path="/v1/messages", **{"x-api-key": "k3"})
    assert r.status_code == 401 and r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    # DNS rebinding (a hostile name for 127.0.0.1) and cross-site pages: 403
    r = call(guarded, body, Host="evil.example:8080")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host"
    r = call(guarded, body, Origin="http://evil.example")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    assert call(guarded, body, Origin="http://app.example").status_code == 200  # --allowed-origins
    assert call(guarded, body, Origin="http://localhost:3000").status_code == 200
    # a form post a page can send without asking first: not JSON, 415
    r = httpx.post(guarded.url + "/v1/completions", content=b"model=tiny&prompt=hi",
                   headers={"Authorization": "Bearer k1", "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415


def test_limits(guarded):
    ok = {"model": "tiny", "prompt": "hi"}
    r = call(guarded, ok)  # no max_tokens: the rest of the context, capped by --max-tokens (5)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
    r = httpx.post(guarded.url + "/v1/completions", content=b'{"prompt": "' + b"a" * (3 * 2**20) + b'"}',
                   headers={"Authorization": "Bearer k1", "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert call(guarded, {**ok, "prompt": "word " * 400}).json()["error"]["code"] == "context_length_exceeded"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 4}
    assert call(guarded, chat, path="/v1/chat/completions").json()["error"]["param"] == "messages"
    assert call(guarded, {**ok, "stop": ["x" * 9]}).json()["error"]["param"] == "stop"
    assert call(guarded, {**ok, "stop": list("abcde")}).json()["error"]["param"] == "stop"
    # a generation past --request-timeout (0.1 s) ends there, with finish_reason length
    r = call(guarded, {**ok, "max_tokens": 480, "ignore_eos": True, "prompt": "a"})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert 0 < r.json()["usage"]["completion_tokens"] < 480


def test_the_event_loop_never_blocks(guarded):
    """/health answers quickly while a megabyte-sized request is being read, parsed and refused."""
    big = b'{"model": "tiny", "messages": [' + b",".join([b'{"role": "user", "content": "' + b"x" * 1000 + b'"}'] * 1900) + b"]}"
    assert len(big) > 2**20 and len(big) < 2 * 2**20
    done = []

    def send():
        done.append(httpx.post(guarded.url + "/v1/chat/completions", content=big, timeout=60,
                               headers={"Authorization": "Bearer k1", "Content-Type": "application/json"}))

    t = threading.Thread(target=send)
    t.start()
    worst = 0.0
    while t.is_alive():
        start = time.perf_counter()
        assert httpx.get(guarded.url + "/health", timeout=5).status_code == 200
        worst = max(worst, time.perf_counter() - start)
    t.join()
    assert done[0].status_code == 400  # too many messages (parsed off the event loop)
    assert worst < 0.1, worst


def test_the_prompt_cache_is_no_side_channel(guarded):
    """A cached prefix is reused (and reported) only under the same salt: cache_salt, and with
    several API keys each key is its own salt."""
    first = {"model": "tiny", "prompt": "The secret plan is to meet at noon by the old", "max_tokens": 2}
    assert call(guarded, first, key="k1").status_code == 200

    def cached(key, **extra):
        r = call(guarded, {**first, "prompt": first["prompt"] + " bridge", **extra}, key=key)
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    # another key learns nothing of k1's prompt (at most the BOS its own earlier requests share)
    assert cached("k2") <= 1
    assert cached("k1", cache_salt="other") == 0  # another salt, same key: nothing
    assert cached("k1") > 5  # the same key, no salt: its own earlier prompt
    call(guarded, {**first, "cache_salt": "s"}, key="k1")
    assert cached("k1", cache_salt="s") > 5


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 0)])
def test_ctrl_c_and_sigterm_refuse_the_queue_let_in_flight_finish_and_exit(tiny_folder, sig, code):
    """SIGINT (Ctrl-C) and SIGTERM (systemd, containers, kill): queued requests are answered 503 at
    once, the one decoding finishes, the process exits cleanly (the engine's worker stops before the
    model is closed): 130 after Ctrl-C as every billion command, 0 after SIGTERM (a requested stop)."""
    import signal

    with serve_process(tiny_folder("tinyllama"), "--parallel", "1", "--shutdown-timeout", "20") as served:
        url, proc = served.url, served.proc
        model = tiny_folder("tinyllama").name
        body = {"model": model, "prompt": "a", "max_tokens": 480, "ignore_eos": True}
        answers: dict = {}

        def send(i):
            answers[i] = httpx.post(url + "/v1/completions", json=body, timeout=60)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        threads[0].start()
        time.sleep(0.1)  # the first is decoding (480 tokens take the tiny model about a second)
        for t in threads[1:]:
            t.start()  # and the others queue behind the one slot
        time.sleep(0.1)
        proc.send_signal(getattr(signal, sig))
        for t in threads:
            t.join(60)
        codes = [answers[i].status_code for i in range(3)]
        assert codes[0] == 200 and 503 in codes and set(codes) <= {200, 503}, [r.text[:200] for r in answers.values()]
        for r in answers.values():
            if r.status_code == 200:  # in flight: finished, not cut
                assert r.json()["usage"]["completion_tokens"] == 480
            else:
                assert r.json()["error"]["code"] == "shutting_down"
        seen = served.output()
        assert proc.returncode == code, seen
        assert "Traceback" not in seen
