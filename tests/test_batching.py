"""Continuous batching: each sequence in a batch gets the tokens it gets alone (greedy, and seeded
sampling with penalties), whatever joins or leaves around it, on both engines; and a real `billion
serve` process driven by the official openai client with concurrent streams of mixed lengths, one
joining mid-batch, one disconnecting, one stopped by a stop string, and a full queue answered 429."""

from __future__ import annotations

import threading
import time

import numpy as np
import openai
import pytest

from backends.types import GenerationConfig
from tests.conftest import ENGINES
from tests.doubles import scheduled
from tests.servers import serve_process

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx


def alone(backend, prompt, gen):
    """The tokens one request gets by itself: a batch of one on the engine's KV session (no padding,
    no neighbours), EOS included."""
    return [t for t, _ in scheduled(backend, prompt, gen)]


def drive(batch, until_step=None, join=()):
    """Step the batch until it is idle; `join` adds (step, prompt, gen) requests mid-batch.
    Returns {uid: tokens} and {uid: finish reason}."""
    tokens, reasons, step, joined = {}, {}, 0, {}
    while batch.busy or any(s >= step for s, _, _ in join):
        for s, prompt, gen in join:
            if s == step:
                joined[(s, tuple(prompt))] = batch.add(prompt, gen)
        for e in batch.step():
            if e.token is not None:
                tokens.setdefault(e.uid, []).append(e.token)
            if e.finish_reason:
                reasons[e.uid] = e.finish_reason
        step += 1
    return tokens, reasons, joined


@pytest.mark.parametrize("engine", ENGINES)
def test_each_sequence_gets_its_own_tokens_whatever_shares_the_batch(engine, tiny_model):
    b = tiny_model(engine)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, b.vocab_size, n).tolist() for n in (5, 14, 3, 9, 7)]
    gens = [GenerationConfig(max_tokens=n, ignore_eos=True) for n in (6, 12, 4, 8, 10)]
    # a seeded sampled request with every filter and penalty: the same tokens in any company
    gens[3] = GenerationConfig(max_tokens=8, temperature=0.8, seed=3, top_k=20, top_p=0.9, min_p=0.02,
                               repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, ignore_eos=True)
    want = [alone(b, p, g) for p, g in zip(prompts, gens)]
    batch = b.batch(max_batch=3)  # more requests than slots: some wait, then join as others leave
    uids = [batch.add(p, g) for p, g in zip(prompts[:4], gens[:4])]
    tokens, reasons, joined = drive(batch, join=[(2, prompts[4], gens[4])])
    uids.append(joined[(2, tuple(prompts[4]))])
    for i, uid in enumerate(uids):
        assert tokens[uid] == want[i], f"request {i}"
        assert reasons[uid] == "max_tokens"
    assert not batch.rows and not batch.waiting


def test_prompts_that_arrive_together_are_prefilled_in_one_forward_pass(tiny_model):
    """Whole prompts waiting together go in as one left-padded forward pass (torch's prefill_many),
    each then with the tokens it gets alone; a prompt whose prefix is in the prompt cache goes in alone."""
    b = tiny_model("torch")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, b.vocab_size, n).tolist() for n in (5, 12, 3)]
    gen = GenerationConfig(max_tokens=5, ignore_eos=True)
    want = [alone(b, p, gen) for p in prompts]
    batch = b.batch(max_batch=4)
    shapes = []
    hook = b.model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        uids = [batch.add(p, gen) for p in prompts]
        tokens, _, _ = drive(batch)
        assert shapes[:2] == [(3, 12), (3, 1)]  # the three prompts in one pass, then a decode step of three rows
        assert [tokens[u] for u in uids] == want
        shapes.clear()
        again = [batch.add(prompts[0] + want[0][:2], gen), batch.add(prompts[1], gen)]  # both found in the cache
        drive(batch)
        assert shapes[0][0] == 1 and shapes[1][0] == 1  # each alone, from its cached prefix
        assert len(again) == 2
    finally:
        hook.remove()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_prompt_prefilled_in_chunks_gives_the_tokens_of_a_whole_one(engine, tiny_model):
    """prefill_chunk (billion serve --prefill-chunk): a long prompt goes in 7 tokens a step while the
    row already there decodes, and every request's tokens are those of whole prefills (float32,
    greedy), the next turn's (a cached prefix, then the rest in chunks) too."""
    b = tiny_model(engine)
    rng = np.random.default_rng(1)
    short, long, tail = (rng.integers(0, b.vocab_size, n).tolist() for n in (4, 60, 20))
    gen = GenerationConfig(max_tokens=8, ignore_eos=True)

    def run(chunk):
        batch = b.batch(max_batch=4, prefill_chunk=chunk)
        first, second = batch.add(short, gen), batch.add(long, gen)
        tokens, order = {first: [], second: []}, []
        while batch.busy:
            for e in batch.step():
                if e.token is not None:
                    tokens[e.uid].append(e.token)
                    order.append("short" if e.uid == first else "long")
        batch.add(long + tokens[second] + tail, gen)  # the next turn
        events = []
        while batch.busy:
            events += batch.step()
        return tokens[first], tokens[second], [e.token for e in events if e.token is not None], \
            events[0].cached_tokens, order

    *whole, _ = run(None)
    *chunked, order = run(7)
    assert chunked == whole and whole[3] > 60  # the same tokens; the turn's prefix came from the cache
    assert order[:8] == ["short"] * 8  # the short row decoded all its tokens while the long prompt went in


@pytest.mark.parametrize("engine", ENGINES)
def test_cancel_eos_and_the_prompt_cache(engine, tiny_model):
    b = tiny_model(engine)
    batch = b.batch(max_batch=4)
    prompt = b.tokenize("Once upon a time there was")
    long = batch.add(prompt, GenerationConfig(max_tokens=50, ignore_eos=True))
    queued = batch.add(prompt, GenerationConfig(max_tokens=5, ignore_eos=True))
    first = batch.step()
    assert {e.uid for e in first} == {long, queued}
    batch.cancel(long)
    events = batch.step()
    assert any(e.uid == long and e.finish_reason == "cancelled" and e.token is None for e in events)
    tokens, reasons, _ = drive(batch)
    assert reasons[queued] == "max_tokens" and long not in reasons
    # a request ending at EOS: its EOS token is its last
    eos = next(iter(b.eos_ids))
    want = alone(b, prompt, GenerationConfig(max_tokens=12))
    uid = batch.add(prompt, GenerationConfig(max_tokens=12))
    tokens, reasons, _ = drive(batch)
    expected = want[: want.index(eos) + 1] if eos in want else want
    assert tokens[uid] == expected and reasons[uid] == ("eos" if eos in want else "max_tokens")
    # the next turn of a conversation starts with the last one: only the new tokens are prefilled
    turn = prompt + tokens[uid] + b.tokenize(" and then", add_special_tokens=False)
    uid = batch.add(turn, GenerationConfig(max_tokens=4, ignore_eos=True))
    first = batch.step()
    assert next(e for e in first if e.uid == uid).cached_tokens >= len(prompt)
    rest, _, _ = drive(batch)
    got = [e.token for e in first if e.uid == uid] + rest[uid]
    assert got == alone(b, turn, GenerationConfig(max_tokens=4, ignore_eos=True))


# ---------------------------------------------------------------- a real server process


@pytest.fixture(scope="module")
def served(tiny_folder):
    """`billion serve` as a process: tiny Llama on torch, 8 slots, a queue of 2."""
    folder = tiny_folder("tinyllama")
    with serve_process(folder, "--parallel", "8", "--queue-size", "2") as served:
        yield folder.name, served.url, openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                                                     timeout=120)


def stream_text(client, model, prompt, max_tokens, **kw):
    """(text, usage) of one streamed completion."""
    events = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, **kw)
    text, usage, reason = "", None, None
    for e in events:
        if e.choices:
            text += e.choices[0].text
            reason = e.choices[0].finish_reason or reason
        if e.usage:
            usage = e.usage
    return text, usage, reason


def test_concurrent_streams_join_leave_stop_and_overflow(served, tiny_model):
    model, url, client = served
    b = tiny_model("torch")
    prompts = [f"Story {i}: once upon a time" for i in range(8)]
    lengths = [40, 12, 60, 25, 80, 30, 50, 18]
    # (a stream never ends on half a UTF-8 character: random weights write some)
    want = {i: b.detokenize(alone(b, b.tokenize(p), GenerationConfig(max_tokens=n, ignore_eos=True))).rstrip("\ufffd")
            for i, (p, n) in enumerate(zip(prompts, lengths))}
    stop = want[3][10:14]  # a stop string the 4th reply reaches
    assert stop and want[3].find(stop) >= 0
    got, errors = {}, []

    def run(i, delay=0.0, **kw):
        time.sleep(delay)
        try:
            got[i] = stream_text(client, model, prompts[i], lengths[i], extra_body={"ignore_eos": True}, **kw)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,), kwargs={"stop": [stop]} if i == 3 else {})
               for i in (0, 1, 2, 3, 6, 7)]
    threads.append(threading.Thread(target=run, args=(4, 0.3)))  # joins while the others decode
    for t in threads:
        t.start()
    # one client that leaves after a few events: its slot is freed for the rest
    body = {"model": model, "prompt": prompts[5], "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for n, line in enumerate(r.iter_lines()):
            if n >= 3:
                break
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in (0, 1, 2, 4, 6, 7):
        text, usage, reason = got[i]
        assert text == want[i], f"request {i}"
        assert usage.completion_tokens == lengths[i] and reason == "length"
    text, usage, reason = got[3]
    assert text == want[3][: want[3].find(stop)] and reason == "stop" and usage.completion_tokens < lengths[3]


def test_a_full_queue_is_a_429_with_retry_after(served):
    model, url, client = served
    body = {"model": model, "prompt": "a", "max_tokens": 480, "ignore_eos": True, "stream": True}
    stop = threading.Event()

    def hold():  # a stream read slowly: its slot (or queue place) stays taken until `stop`
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                if stop.wait(0.05):
                    return

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(10)]
    for t in holders:
        t.start()
    try:
        deadline = time.time() + 30  # 8 slots and 2 queue places taken
        while httpx.get(url + "/health").json()["requests"][model] < 10:
            assert time.time() < deadline, httpx.get(url + "/health").json()
            time.sleep(0.02)
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 429 and r.headers.get("retry-after") == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        stop.set()
        for t in holders:
            t.join(30)
    deadline = time.time() + 30  # the streams' clients are gone: their slots come back
    while True:
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        if r.status_code == 200 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_all_is_each_prompt_alone(engine, tiny_model):
    """What eval's generate-until requests and HumanEval use: the same tokens and text batched
    (--batch-size 3) as one at a time, a caller's stop rule and gen.stop included."""
    from backends.batching import generate_all

    b = tiny_model(engine)
    prompts = [b.tokenize(t) for t in ("Once upon", "The sky is", "A B C D", "Why?", "Hello there friend")]
    plain = generate_all(b, prompts, [GenerationConfig(max_tokens=10, ignore_eos=True)] * 5, max_batch=1)
    cut = plain[2].text[4:6]
    gens = [GenerationConfig(max_tokens=n, ignore_eos=True, stop=(cut,) if i == 2 else ())
            for i, n in enumerate((10, 7, 10, 3, 9))]

    def stop_when(i, text):  # a caller's rule on the 2nd prompt only
        return i == 1 and len(text) >= 5

    one = generate_all(b, prompts, gens, max_batch=1, stop_when=stop_when)
    many = generate_all(b, prompts, gens, max_batch=3, stop_when=stop_when)
    assert [(g.tokens, g.text, g.finish_reason) for g in many] == [(g.tokens, g.text, g.finish_reason) for g in one]
    assert many[2].finish_reason == "stop" and cut not in many[2].text
    assert many[1].finish_reason in ("stopped", "max_tokens") and many[3].finish_reason == "max_tokens"


def test_prompt_lookup_inside_a_batch_is_each_rows_own_speculation(tiny_model):
    """--draft ngram inside a batch (torch): every row drafts from its own text, all rows' proposals
    are verified in one pass, rejected ones become masked holes; each row's tokens are those of
    speculative decoding alone (greedy: the target's own; seeded sampling: the same draws)."""
    from backends.speculation import NgramDraft

    b = tiny_model("torch")
    rng = np.random.default_rng(1)
    blocks = [rng.integers(0, b.vocab_size, 6).tolist() for _ in range(5)]
    prompts = [(blk * 5)[:28] for blk in blocks]  # repetition: something to look up
    gens = [GenerationConfig(max_tokens=n, ignore_eos=True) for n in (20, 12, 25, 16, 30)]
    gens[3] = GenerationConfig(max_tokens=16, temperature=0.7, seed=4, top_k=30, ignore_eos=True)
    want = [[t for t, _ in scheduled(b, p, g, NgramDraft(2), 3)] for p, g in zip(prompts, gens)]
    assert want[0] == alone(b, prompts[0], gens[0])  # greedy speculation is the target's own
    batch = b.batch(max_batch=3, draft=NgramDraft(2), num_draft=3)
    uids = [batch.add(p, g) for p, g in zip(prompts, gens)]
    tokens, reasons, _ = drive(batch)
    assert [tokens[u] for u in uids] == want
    assert batch.stats.drafted > 0  # it did draft
    # a finished row's cache, holes left out, serves the next turn from the prompt cache
    turn = prompts[0] + want[0] + prompts[1][:4]
    uid = batch.add(turn, GenerationConfig(max_tokens=6, ignore_eos=True))
    first = batch.step()
    assert next(e for e in first if e.uid == uid).cached_tokens >= len(prompts[0])
    rest, _, _ = drive(batch)
    got = [e.token for e in first if e.uid == uid and e.token is not None] + rest.get(uid, [])
    assert got == alone(b, turn, GenerationConfig(max_tokens=6, ignore_eos=True))


def test_prompt_lookup_inside_an_mlx_batch_is_refused(tiny_model):
    from backends.speculation import NgramDraft
    from backends.types import UserError

    with pytest.raises(UserError, match="prompt lookup inside a batch"):
        tiny_model("mlx").batch(draft=NgramDraft(3))


def test_mlx_batch_of_one_runs_ahead_on_the_devices_argmax_and_takes_back_a_wrong_guess(tiny_model):
    """MLX's batch of one launches step n+1 on the device's argmax before the host samples step n
    (mlx-lm's overlap). The logits are a plain session's whether the host takes the guess or not."""
    import numpy as np

    from backends.mlx_engine.batch import MLXOneRowCache

    b = tiny_model("mlx")
    prompt = [5, 9, 2, 7]
    cache = MLXOneRowCache(b)
    cache.expect(len(prompt), GenerationConfig(max_tokens=10))
    row, first = cache.prefill(prompt)
    cache.add(row)
    session = b.session()
    np.testing.assert_allclose(first, session.feed(prompt, keep=1)[-1], atol=1e-5)
    t0 = int(np.argmax(first))
    step1 = cache.decode([t0])[0]
    assert cache.ahead is not None  # the next step is under way
    guess = int(np.argmax(step1))
    np.testing.assert_allclose(step1, session.feed([t0], keep=1)[-1], atol=1e-5)
    step2 = cache.decode([guess])[0]  # the guess taken
    np.testing.assert_allclose(step2, session.feed([guess], keep=1)[-1], atol=1e-5)
    other = (int(np.argmax(step2)) + 1) % b.vocab_size  # the host picks another token
    step3 = cache.decode([other])[0]
    np.testing.assert_allclose(step3, session.feed([other], keep=1)[-1], atol=1e-5)
    assert cache.extract(0)[0].offset == len(prompt) + 3  # the last guess taken back: prompt + fed tokens


@pytest.mark.parametrize("engine", ENGINES)
def test_a_single_stream_carries_logprobs_as_a_served_request_does(tiny_model, engine):
    """Backend.stream is the scheduler's batch of one: gen.logprobs reaches its chunks (the old
    single-stream loops ignored it), with the values of the engine's own logits."""
    from backends import sampling

    b = tiny_model(engine)
    prompt = [5, 9, 2, 7]
    chunks = list(b.stream(prompt, GenerationConfig(max_tokens=3, ignore_eos=True, logprobs=2)))
    assert len(chunks) == 3 and all(c.logprobs is not None and len(c.logprobs[2]) == 2 for c in chunks)
    first = chunks[0]
    logprob, top = sampling.logprobs(b.session().feed(prompt, keep=1)[-1], first.token, 2)
    text, got, alternatives = first.logprobs  # (token text, log-probability, top (text, log-probability))
    assert text == b.tokenizer.decode([first.token]) and got == pytest.approx(logprob, abs=1e-4)
    assert got == pytest.approx(alternatives[0][1], abs=1e-6)  # greedy: the most likely one
    assert alternatives[0][0] == b.tokenizer.decode([top[0][0]])
