"""`billion serve`: a real uvicorn server on 127.0.0.1 (in a thread, and the CLI as a process) over tiny
models, driven by the official `openai` client; errors, disconnects, concurrency, both engines."""

from __future__ import annotations

import json
import threading
import time

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx
import openai
import pytest

from backends.types import GenerationConfig
from tests.conftest import ENGINES
from tests.servers import serve_process

QUESTION = "Why is the sky blue?"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Server:
    """A uvicorn.Server on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(tiny_model):
    from billion.server.app import create_app

    srv = Server(create_app({f"tiny@{e}": tiny_model(e) for e in ENGINES}))
    yield srv
    srv.stop()


def expected_reply(backend, messages, max_tokens):
    ids = backend.apply_chat_template(messages)
    tokens = backend.generate(ids, GenerationConfig(max_tokens=max_tokens))
    return backend.detokenize(tokens), len(ids), len(tokens)


def ask(client, model, text=QUESTION, temperature=0.0, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          temperature=temperature, **kw)


def test_models_health_and_chat(server, tiny_model):
    assert [m.id for m in server.client.models.list().data] == ["tiny@mlx", "tiny@torch"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    want, n_prompt, n_out = expected_reply(tiny_model("torch"), [{"role": "user", "content": QUESTION}], 12)
    r = ask(server.client, "tiny@torch", max_tokens=12)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.strip() == want.strip() and want.strip()
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_out)
    assert r.usage.total_tokens == n_prompt + n_out
    assert r.choices[0].finish_reason == ("length" if n_out == 12 else "stop")
    # streamed: the same text, as server-sent events, with a final usage chunk
    events = list(ask(server.client, "tiny@torch", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == r.choices[0].message.content
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == r.choices[0].finish_reason
    assert events[-1].usage.completion_tokens == n_out and events[-1].usage.prompt_tokens == n_prompt


def test_completions_streamed_and_not(server, tiny_model):
    backend = tiny_model("mlx")
    ids = backend.tokenize("Once upon a time")
    want = backend.detokenize(backend.generate(ids, GenerationConfig(max_tokens=8)))
    r = server.client.completions.create(model="tiny@mlx", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text.strip() == want.strip()
    assert r.usage.prompt_tokens == len(ids)
    streamed = server.client.completions.create(model="tiny@mlx", prompt="Once upon a time", max_tokens=8,
                                                temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    # token ids as the prompt, a stop string, ignore_eos
    assert len(r.choices[0].text) >= 5
    stop = r.choices[0].text[3:5]
    cut = server.client.completions.create(model="tiny@mlx", prompt=ids, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == r.choices[0].text[:r.choices[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    full = server.client.completions.create(model="tiny@mlx", prompt=ids, max_tokens=20, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 20 and full.choices[0].finish_reason == "length"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_reply_with_no_text_is_answered_at_once_json_and_streamed(server, tiny_model, engine):
    """A generation that ends before its first chunk (its first token EOS, which lm-eval's
    one-token scoring requests meet) is answered at once with empty text, JSON and streamed,
    echo included (it used to wait forever for a second end)."""
    import numpy as np

    backend = tiny_model(engine)
    prompt = next([1, i] for i in range(3, 1000)
                  if int(np.argmax(backend.batch_logits([[1, i]], [[1]])[0][0])) in backend.eos_ids)
    kw = dict(model=f"tiny@{engine}", prompt=prompt, max_tokens=1, temperature=0, timeout=20)
    r = server.client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 0)
    echoed = server.client.completions.create(echo=True, logprobs=1, **kw)
    assert echoed.choices[0].text == backend.tokenizer.decode(prompt)
    # the prompt's two entries (the first null), then the EOS that ended the reply, as vLLM lists it:
    # lm-eval's local-completions reads every entry but the last as the prompt's
    logprobs = echoed.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and logprobs.token_logprobs[0] is None
    x = backend.batch_logits([prompt], [[1]])[0][0].astype(np.float64)
    assert logprobs.token_logprobs[2] == pytest.approx(-np.log(np.exp(x - x.max()).sum()), abs=1e-4)  # the argmax
    streamed = list(server.client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == "" and streamed[-1].choices[0].finish_reason == "stop"


def test_same_greedy_reply_on_both_engines(server):
    replies = [ask(server.client, f"tiny@{e}", "Tell me a story.", max_tokens=24) for e in ENGINES]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    counts = [(r.usage.prompt_tokens, r.usage.completion_tokens) for r in replies]
    assert replies[0].choices[0].message.content and counts[0] == counts[1]
    # and sampled with a seed, through the shared sampler
    sampled = [ask(server.client, f"tiny@{e}", "Tell me a story.", temperature=0.9, max_tokens=24, seed=5,
                   extra_body={"top_k": 20, "repetition_penalty": 1.2}) for e in ENGINES]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content


def post(server, path, body, raw=False):
    return httpx.post(server.url + path, content=body if raw else json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=30)


def test_bad_requests_are_json_errors_and_the_server_goes_on(server):
    chat = {"model": "tiny@torch", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        (b'{"model": "tiny@torch", "messages": [', True, 400, "invalid_json"),
        (b"[1, 2]", True, 400, "invalid_json"),
        ({**chat, "model": "gpt-4"}, False, 404, "model_not_found"),
        ({**chat, "max_tokens": "many"}, False, 400, "invalid_value"),
        ({**chat, "temperature": "hot"}, False, 400, "invalid_value"),
        ({**chat, "messages": "hi"}, False, 400, "invalid_value"),
        ({k: v for k, v in chat.items() if k != "messages"}, False, 400, "missing_required_parameter"),
        ({**chat, "n": 17}, False, 400, "invalid_value"),
        ({**chat, "messages": [{"role": "user", "content": "Paris is in France. " * 200}]}, False, 400,
         "context_length_exceeded"),
        ({**chat, "max_tokens": 100000}, False, 400, "context_length_exceeded"),
    ]
    for body, raw, status, code in cases:
        r = post(server, "/v1/chat/completions", body, raw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
        assert "Traceback" not in r.text
    r = post(server, "/v1/completions", {"model": "tiny@mlx", "prompt": "x", "max_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        ask(server.client, "nope", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(server.client, "tiny@mlx", "Paris is in France. " * 200, max_tokens=2)
    assert ask(server.client, "tiny@torch", max_tokens=3).usage.completion_tokens == 3  # still serving


@pytest.mark.parametrize("engine", ENGINES)
def test_disconnect_mid_stream_frees_the_engine(server, engine):
    state = server.app.state.engines[f"tiny@{engine}"]
    before = len(state.done)
    body = {"model": f"tiny@{engine}", "prompt": "a", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        got = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                got.append(line)
            if len(got) == 3:
                break
    deadline = time.time() + 20
    while len(state.done) == before:
        assert time.time() < deadline, "the generation did not end"
        time.sleep(0.01)
    tokens, reason = state.done[-1]
    assert reason == "interrupted" and 3 <= tokens < 500  # stopped early, not run to the end
    r = ask(server.client, f"tiny@{engine}", max_tokens=4)  # the engine is free again
    assert r.usage.completion_tokens == 4


def test_concurrent_clients_are_queued_and_both_correct(server, tiny_model):
    prompts = ["Why is the sky blue?", "What is rain?"]
    want = [expected_reply(tiny_model("torch"), [{"role": "user", "content": p}], 16)[0].strip() for p in prompts]
    got: dict = {}

    def client(i):
        if i == 0:
            got[i] = ask(server.client, "tiny@torch", prompts[i], max_tokens=16).choices[0].message.content
        else:
            events = ask(server.client, "tiny@torch", prompts[i], max_tokens=16, stream=True)
            got[i] = "".join(e.choices[0].delta.content or "" for e in events)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i].strip() for i in range(2)] == want


def test_a_conversation_reuses_the_engines_kv_cache(server):
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    first = server.client.chat.completions.create(model="tiny@torch", messages=messages, max_tokens=8, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the sea?"}]
    second = server.client.chat.completions.create(model="tiny@torch", messages=messages, max_tokens=8, temperature=0)
    # the first prompt (give or take a token where the reply's text meets it) comes from the cache
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2


def test_cli_serves_one_engine_under_the_plain_name_too(tiny_folder):
    from billion.commands.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    folder = tiny_folder("tinyllama")
    with serve_process(folder) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [f"{folder.name}@torch", folder.name]
        seen = "".join(served.log)
        assert "serving" in seen and "warning" not in seen.lower()
        r = ask(client, folder.name, max_tokens=5)
        assert r.usage.completion_tokens == 5 and r.model == folder.name


# ---------------------------------------------------------------- /tokenize, /detokenize, /metrics


def test_tokenize_and_detokenize_agree_with_the_engine_and_the_chat_route(server, tiny_model):
    backend = tiny_model("torch")
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny@torch", "prompt": "Once upon a time"}).json()
    assert r == {"tokens": backend.tokenize("Once upon a time"), "count": len(r["tokens"]),
                 "max_model_len": backend.context_length}
    back = httpx.post(server.url + "/detokenize", json={"model": "tiny@torch", "tokens": r["tokens"]}).json()
    assert back["prompt"].endswith("Once upon a time")
    # messages count as many tokens as the chat route's usage says
    messages = [{"role": "user", "content": QUESTION}]
    counted = httpx.post(server.url + "/tokenize", json={"model": "tiny@mlx", "messages": messages}).json()["count"]
    assert counted == ask(server.client, "tiny@mlx", max_tokens=2).usage.prompt_tokens
    # lm-eval's remote tokenizer (vLLM's /tokenizer_info, /tokenize, /detokenize, no model named)
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    assert lm_eval_utils.check_remote_tokenizer_support(server.url + "/v1/completions")
    remote = lm_eval_utils.RemoteTokenizer(server.url + "/v1/completions")
    assert remote.encode("Once upon a time") == backend.tokenize("Once upon a time", add_special_tokens=False)
    assert remote.decode(remote.encode("Once upon a time")) == "Once upon a time"
    assert remote.eos_token == backend.tokenizer.eos_token
    for path, body, param in [("/tokenize", {"model": "tiny@torch"}, None),
                              ("/tokenize", {"model": "nope", "prompt": "a"}, "model"),
                              ("/detokenize", {"model": "tiny@torch", "tokens": [-1]}, "tokens"),
                              ("/detokenize", {"model": "tiny@torch", "tokens": "abc"}, "tokens")]:
        bad = httpx.post(server.url + path, json=body)
        assert bad.status_code in (400, 404) and bad.json()["error"]["param"] == param, (path, body, bad.text)


def test_metrics_after_traffic_parse_with_prometheus_client(server):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = httpx.get(server.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    r = ask(server.client, "tiny@torch", max_tokens=6, temperature=1.0, seed=3)
    streamed = list(ask(server.client, "tiny@torch", max_tokens=6, temperature=1.0, seed=3, stream=True))
    httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny@torch", "messages": []})  # a 400
    after = scrape()

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("billion_requests_total", route="/v1/chat/completions", status="200") == 2
    assert grew("billion_requests_total", route="/v1/chat/completions", status="400") == 1
    assert grew("billion_prompt_tokens_total", model="tiny@torch") == 2 * r.usage.prompt_tokens
    assert grew("billion_generation_tokens_total", model="tiny@torch") == 2 * r.usage.completion_tokens
    assert grew("billion_time_to_first_token_seconds_count", model="tiny@torch") == 2
    # a token after the first: one inter-token latency each
    assert grew("billion_inter_token_latency_seconds_count", model="tiny@torch") == 2 * (r.usage.completion_tokens - 1)
    assert len([e for e in streamed if e.choices and e.choices[0].delta.content]) >= 1
    for gauge in ("billion_queue_depth", "billion_running_requests", "billion_prompt_cache_rows"):
        assert (gauge, (("model", "tiny@mlx"),)) in after and (gauge, (("model", "tiny@torch"),)) in after
    assert after[("billion_running_requests", (("model", "tiny@torch"),))] == 0  # nothing in flight now


def test_n_choices_are_decoded_together_each_with_its_own_seed(server):
    """n > 1: each choice is the reply a request with seed + i gets alone; streamed, the choices'
    chunks interleave under their index and reassemble to the same texts; usage counts them all."""
    kw = dict(model="tiny@torch", max_tokens=8, temperature=1.0, seed=11)
    alone = [ask(server.client, text="Tell me a story.", **{**kw, "seed": 11 + i}) for i in range(3)]
    r = ask(server.client, text="Tell me a story.", n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [a.choices[0].message.content for a in alone]
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert len({c.message.content for c in r.choices}) > 1  # different seeds: different samples
    texts, finished = {}, set()
    for event in ask(server.client, text="Tell me a story.", n=3, stream=True, **kw):
        for choice in event.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2} and [texts[i] for i in range(3)] == [c.message.content for c in r.choices]
    # completions too, with each choice's own text
    c = server.client.completions.create(model="tiny@mlx", prompt="Once upon a time", max_tokens=6, n=2,
                                         temperature=1.0, seed=5)
    assert [x.index for x in c.choices] == [0, 1] and all(x.text for x in c.choices)


def test_the_new_dialects_refuse_bad_input_with_a_4xx_in_their_own_shape(server):
    """Responses and Messages: malformed, mistyped, hostile or unsupported requests get a 4xx in
    their API's error shape (OpenAI's for /v1/responses, Anthropic's for /v1/messages), never a
    500, and the server goes on answering."""
    messages = {"model": "tiny@torch", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    responses = {"model": "tiny@torch", "input": "hi", "max_output_tokens": 4}
    deep = b"[" * 100000 + b"]" * 100000
    for path, good, bad in [
        ("/v1/messages", messages, [b"{", b"[1]", deep, {**messages, "messages": []}, {**messages, "max_tokens": 0},
                                    {**messages, "max_tokens": "many"}, {k: v for k, v in messages.items()
                                                                          if k != "max_tokens"},
                                    {**messages, "model": "gpt-4"}, {**messages, "temperature": -1},
                                    {**messages, "messages": [{"role": "system", "content": "x"}]},
                                    {**messages, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
                                    {**messages, "tool_choice": {"type": "sometimes"}},
                                    {**messages, "tools": [{"name": "f"}]},
                                    {**messages, "messages": [{"role": "user", "content": "word " * 3000}]},
                                    {**messages, "stop_sequences": ["a"] * 9}]),
        ("/v1/responses", responses, [b"{", b"[1]", deep, {**responses, "input": 5},
                                      {**responses, "input": [{"type": "input_image"}]},
                                      {**responses, "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
                                      {**responses, "max_output_tokens": 0}, {**responses, "model": "gpt-4"},
                                      {**responses, "temperature": 9}, {**responses, "tools": [{"type": "computer"}]},
                                      {**responses, "tool_choice": {"type": "mcp"}},
                                      {**responses, "text": {"format": {"type": "yaml"}}},
                                      {**responses, "input": "word " * 3000}])]:
        for body in bad:
            r = (httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
                 if isinstance(body, bytes) else httpx.post(server.url + path, json=body, timeout=30))
            assert 400 <= r.status_code < 500, (path, str(body)[:80], r.status_code, r.text[:200])
            err = r.json()
            if path == "/v1/messages":
                assert err["type"] == "error" and set(err["error"]) == {"type", "message"}, err
            else:
                assert set(err["error"]) == {"message", "type", "param", "code"}, err
            assert "Traceback" not in r.text
        assert httpx.post(server.url + path, json=good, timeout=30).status_code == 200  # still up


def test_messages_say_which_stop_sequence_ended_the_reply(server):
    body = {"model": "tiny@torch", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION}]}
    text = httpx.post(server.url + "/v1/messages", json=body, timeout=30).json()["content"][0]["text"]
    assert len(text) >= 5
    stop = text[3:5]
    cut = httpx.post(server.url + "/v1/messages", json={**body, "stop_sequences": ["\u00a7never", stop]}, timeout=30).json()
    assert (cut["stop_reason"], cut["stop_sequence"]) == ("stop_sequence", stop)
    assert cut["content"][0]["text"] == text[:text.find(stop)]
    streamed = httpx.post(server.url + "/v1/messages", json={**body, "stop_sequences": [stop], "stream": True},
                          timeout=30).text
    delta = next(json.loads(line[5:]) for line in streamed.splitlines()
                 if line.startswith("data:") and '"message_delta"' in line)
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}
    whole = httpx.post(server.url + "/v1/messages", json=body, timeout=30).json()  # max_tokens: no sequence
    assert whole["stop_sequence"] is None and whole["stop_reason"] in ("max_tokens", "end_turn")
