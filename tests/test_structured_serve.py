"""Structured output through a real `billion serve` process and the official openai client, on the
real SmolLM2-135M-Instruct, on both engines at once: JSON schemas, tool calls (with billion's
chatml-tools template, since SmolLM2's own renders no tools), logprobs; and what cannot be
enforced refused with a 400."""

from __future__ import annotations

import json

import pytest

from tests.servers import serve_process

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

ENGINES = ("torch", "mlx")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "address", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
                         "pets": {"type": "array", "maxItems": 2,
                                  "items": {"enum": ["cat", "dog", "fish"]}}}}
ORDER = {"type": "object", "required": ["items", "total", "paid"], "additionalProperties": False,
         "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2,
                                  "items": {"type": "object", "required": ["sku", "qty"], "additionalProperties": False,
                                            "properties": {"sku": {"type": "string", "maxLength": 8},
                                                           "qty": {"type": "integer", "minimum": 1}}}},
                        "total": {"type": "number"}, "paid": {"type": "boolean"},
                        "note": {"type": ["string", "null"], "maxLength": 20}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone",
    "parameters": {"type": "object", "required": ["timezone"], "additionalProperties": False,
                   "properties": {"timezone": {"type": "string", "maxLength": 24}}}}}


class API(openai.OpenAI):
    """The client, and the model id of each engine (a folder is served under its name)."""

    def __init__(self, url: str, name: str):
        super().__init__(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.name = name

    def model(self, engine: str) -> str:
        return f"{self.name}@{engine}"


@pytest.fixture(scope="module")
def client(real_folder):
    with serve_process(real_folder, "-b", "torch,mlx", "--chat-template", "chatml-tools") as served:
        yield API(served.url, real_folder.name)
    assert "Traceback" not in served.output()


def ask(client, engine, content, **kw):
    return client.chat.completions.create(model=client.model(engine), temperature=0,
                                          messages=[{"role": "user", "content": content}], **kw)


@pytest.mark.parametrize("schema, prompt, engines", [(PERSON, "Invent a person and their address.", ENGINES),
                                                     # (torch alone: MLX's CPU prefill costs ~8 s a prompt here)
                                                     (ORDER, "Write a small shop order.", ("torch",))])
def test_schema_replies_validate_and_agree_across_engines(client, schema, prompt, engines):
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    texts = {}
    for engine in engines:
        r = ask(client, engine, prompt, response_format=fmt, max_tokens=90)
        assert r.choices[0].finish_reason == "stop", r
        texts[engine] = r.choices[0].message.content
        jsonschema.validate(json.loads(texts[engine]), schema)
    assert len(set(texts.values())) == 1  # the engines agree


def test_json_object_on_completions(client):
    r = client.completions.create(model=client.model("torch"), prompt="A JSON object describing a cat:",
                                  max_tokens=40, temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_a_schema_that_cannot_be_enforced_is_refused(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "ids", "schema": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "torch", "List ids.", response_format=fmt, max_tokens=5)
    assert "uniqueItems" in str(e.value) and e.value.body["param"] == "response_format"
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(?=a)a"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "torch", "Call f.", tools=[bad_tool], tool_choice="required", max_tokens=5)
    assert "look-around" in str(e.value) and "'f'" in str(e.value)


def check_call(call, tool):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_required_and_named_tool_calls_are_valid_calls(client):
    """torch only: a call's grammar is masked by the same code on every engine (the schema tests
    above compare the engines); MLX's CPU prefill of a tools prompt costs ~10 s here."""
    r = ask(client, "torch", "What is the weather like in Paris?", tools=[WEATHER, TIME], tool_choice="required",
            parallel_tool_calls=False, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, r
    check_call(choice.message.tool_calls[0], WEATHER)
    named = ask(client, "torch", "What is the weather like in Paris?", tools=[WEATHER, TIME], max_tokens=60,
                tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    check_call(named.choices[0].message.tool_calls[0], TIME)
    # parallel calls (the default): SmolLM2 keeps calling until max_tokens; the complete calls are kept
    r = ask(client, "torch", "What is the weather like in Paris?", tools=[WEATHER, TIME], tool_choice="required",
            max_tokens=60)
    assert r.choices[0].message.tool_calls and r.choices[0].finish_reason == "length"
    for call in r.choices[0].message.tool_calls:
        check_call(call, WEATHER if call.function.name == "get_weather" else TIME)


def test_a_streamed_tool_call_reassembles_to_the_same_call(client):
    kw = dict(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    whole = ask(client, "torch", "Weather in Rome, in celsius?", **kw).choices[0].message.tool_calls
    parts, reason = {}, None
    for chunk in ask(client, "torch", "Weather in Rome, in celsius?", stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or ():
            got = parts.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            got["id"] = tc.id or got["id"]
            got["name"] += (tc.function.name or "") if tc.function else ""
            got["arguments"] += (tc.function.arguments or "") if tc.function else ""
        reason = chunk.choices[0].finish_reason or reason
    assert reason == "tool_calls"
    assert [(p["name"], p["arguments"]) for _, p in sorted(parts.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]
    assert all(p["id"].startswith("call_") for p in parts.values())


def test_auto_tool_choice_answers_text_or_a_valid_call(client):
    """auto: free text until the model starts a call, then the call is constrained (lazy grammar)."""
    for prompt in ("Say hello.", "Call get_weather for Oslo."):
        r = ask(client, "torch", prompt, tools=[WEATHER], tool_choice="auto", max_tokens=60)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                check_call(call, WEATHER)
        else:
            assert choice.message.content and "<tool_call>" not in choice.message.content


def test_a_conversation_with_a_tool_result_continues(client):
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'}]
    r = client.chat.completions.create(model=client.model("torch"), messages=messages, tools=[WEATHER],
                                       max_tokens=30, temperature=0)
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


def test_logprobs_agree_across_engines(client):
    got = {}
    for engine in ENGINES:
        r = ask(client, engine, "Name a colour.", max_tokens=8, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
        assert "".join(c.token for c in content) == r.choices[0].message.content
        for c in content:
            assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6  # greedy: the top
        got[engine] = content
    for a, b in zip(got["torch"], got["mlx"], strict=True):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-3
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.top_logprobs, b.top_logprobs)) < 1e-3
    streamed = [entry for chunk in ask(client, "torch", "Name a colour.", max_tokens=8, logprobs=True,
                                       top_logprobs=3, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    # the same tokens; the values within float32 noise (the streamed request's prompt comes from the prompt cache)
    assert [e.token for e in streamed] == [e.token for e in got["torch"]]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, got["torch"])) < 1e-4
    r = client.completions.create(model=client.model("torch"), prompt="The sky is", max_tokens=4,
                                  temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0


def test_served_prompt_lookup_keeps_the_grammar(real_model, tiny_model):
    """billion serve --draft ngram: a constrained request decodes with prompt lookup inside the batch
    and answers what it answers without; an engine that cannot draft in a batch is refused at start."""
    from backends.speculation import NgramDraft
    from backends.types import UserError
    from billion.server.app import create_app
    from tests.test_serve import Server

    backend = real_model("torch")
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}}
    replies = []
    for draft in (None, NgramDraft(2)):
        srv = Server(create_app({"m": backend}, draft=draft))
        try:
            r = srv.client.chat.completions.create(model="m", temperature=0, max_tokens=90, response_format=fmt,
                                                   messages=[{"role": "user", "content": "Write a small shop order."}])
            replies.append(r.choices[0].message.content)
        finally:
            srv.stop()
    jsonschema.validate(json.loads(replies[1]), ORDER)
    assert replies[1] == replies[0]
    with pytest.raises(UserError, match="prompt lookup inside a batch"):
        create_app({"m": tiny_model("mlx")}, draft=NgramDraft(2))


# ---------------------------------------------------------------- Anthropic's Messages API, by its own SDK

WEATHER_TOOL = {"name": "get_weather", "description": WEATHER["function"]["description"],
                "input_schema": WEATHER["function"]["parameters"]}


@pytest.fixture(scope="module")
def claude(client):
    """The anthropic SDK pointed at the same server (it appends /v1/messages to the base URL)."""
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=str(client.base_url).removesuffix("/").removesuffix("/v1"),
                               api_key="unused", max_retries=0, timeout=120)


def test_anthropic_messages_with_a_tool_streamed_and_not_and_its_result_answered(client, claude):
    model = client.model("torch")
    # greedy: temperature is not among this SDK's arguments, so it goes as an extra field of the body
    ask_weather = dict(model=model, max_tokens=60, extra_body={"temperature": 0}, tools=[WEATHER_TOOL],
                       tool_choice={"type": "any", "disable_parallel_tool_use": True},  # SmolLM2 calls on, else
                       system="Use the tools.", messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    message = claude.messages.create(**ask_weather)
    assert message.type == "message" and message.role == "assistant" and message.stop_reason == "tool_use"
    (call,) = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER_TOOL["input_schema"])
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    with claude.messages.stream(**ask_weather) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    (again,) = [b for b in streamed.content if b.type == "tool_use"]
    assert (again.name, again.input) == (call.name, call.input) and streamed.stop_reason == "tool_use"
    # the call and its result sent back as Anthropic's blocks: the model answers in text
    history = [*ask_weather["messages"], {"role": "assistant", "content": [call.model_dump()]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C, sunny"}]}]
    answer = claude.messages.create(model=model, max_tokens=20, extra_body={"temperature": 0}, tools=[WEATHER_TOOL],
                                    tool_choice={"type": "none"}, messages=history)
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text
    assert answer.stop_reason in ("end_turn", "max_tokens")


def test_anthropic_text_on_mlx_count_tokens_and_errors_in_anthropic_shape(client, claude):
    import anthropic

    model = client.model("mlx")
    messages = [{"role": "user", "content": "Say hello."}]
    with claude.messages.stream(model=model, max_tokens=6, extra_body={"temperature": 0}, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and final.stop_reason in ("end_turn", "max_tokens")
    assert claude.messages.count_tokens(model=model, messages=messages).input_tokens == final.usage.input_tokens
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="nope", max_tokens=5, messages=messages)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=model, max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                        "data": "AAAA"}}]}])
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message":
                            "image blocks are not supported by this server (billion) in a user message"}}


# ---------------------------------------------------------------- OpenAI's Responses API, by its own SDK

WEATHER_FUNCTION = {"type": "function", **WEATHER["function"]}  # the Responses API's tools are flat


def test_responses_with_a_schema_streamed_and_not(client):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    kw = dict(model=client.model("torch"), input="Invent a person and their address.", text=fmt,
              max_output_tokens=90, temperature=0)
    r = client.responses.create(**kw)
    assert r.status == "completed" and r.object == "response" and r.output[0].type == "message"
    jsonschema.validate(json.loads(r.output_text), PERSON)
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    with client.responses.stream(**kw) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == r.output_text  # greedy: the same reply
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}


def test_responses_with_a_tool_and_its_output_sent_back(client):
    kw = dict(model=client.model("torch"), instructions="Use the tools.", tools=[WEATHER_FUNCTION],
              tool_choice="required", parallel_tool_calls=False, max_output_tokens=60, temperature=0,
              input=[{"role": "user", "content": "What is the weather in Paris?"}])
    r = client.responses.create(**kw)
    (call,) = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather" and r.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    with client.responses.stream(**kw) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    (again,) = [item for item in final.output if item.type == "function_call"]
    assert (again.name, again.arguments) == (call.name, call.arguments)
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    # the call and its output as input items: the model answers in text
    answer = client.responses.create(
        model=client.model("torch"), tools=[WEATHER_FUNCTION], tool_choice="none", max_output_tokens=20,
        temperature=0, input=[*kw["input"], {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                             "arguments": call.arguments},
                              {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}])
    assert answer.output_text and [item.type for item in answer.output] == ["message"]
    # nothing is stored: a 400 that says so, naming the field
    for field, value in (("previous_response_id", r.id), ("store", True)):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=client.model("torch"), input="Hi", max_output_tokens=2, **{field: value})
        assert e.value.body["param"] == field and "nothing is stored" in e.value.body["message"]
