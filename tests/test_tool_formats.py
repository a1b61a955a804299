"""Tool-call formats chosen from the model's chat template (billion/server/tool_formats/): detected
on real published templates (llama.cpp's copies, tests/templates.py) and on SmolLM2's own from the
packaged GGUF; each format's calls rendered into a history by the real template and parsed back;
each format's grammar held to its own call text; and calls made end to end by the real
SmolLM2-135M through `billion serve`'s app, with no --chat-template (the generic format) and with
Llama 3.2's template (its JSON format)."""

from __future__ import annotations

import copy
import json

import pytest

from billion.server import tool_formats
from billion.server.tool_formats import generic, hermes, llama3, mistral
from tests.templates import template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 20}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer(real_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_folder)


def test_the_format_is_picked_from_the_template(tokenizer):
    from billion.commands.serve import read_template

    assert tool_formats.detect(template("llama-3.2"))[0] is llama3
    assert tool_formats.detect(template("qwen2.5"))[0] is hermes
    assert tool_formats.detect(read_template("chatml-tools"))[0] is hermes
    assert tool_formats.detect(tokenizer.chat_template)[0] is generic  # SmolLM2's own renders no tools
    assert tool_formats.detect(None)[0] is generic  # a base model
    assert tool_formats.detect(template("mistral-nemo"))[0] is mistral
    # a template that renders tools in a format billion does not know: the generic one, which any template holds
    fmt, why = tool_formats.detect("{{ tools }} <|tool|>{{ messages }}")
    assert fmt is generic and "does not parse" in why
    assert tool_formats.choose(template("qwen2.5"), "generic") == (generic, "--tool-format")
    from billion.commands.serve import serve  # its --tool-format names every format

    option = next(p for p in serve.params if p.name == "tool_format")
    assert list(option.type.choices) == ["auto", *tool_formats.FORMATS]


def _rendered_reply(tokenizer, chat_template: str, fmt, ends: tuple[str, ...]) -> str:
    """The assistant's call as the real template renders it in a history (messages, and the tools
    when the format has the template render them), cut at the turn's end."""
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]}]
    messages, tools = fmt.for_template(history, [WEATHER])
    before, tools_before = fmt.for_template(ASK, [WEATHER])
    whole = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=chat_template)
    prompt = tokenizer.apply_chat_template(before, tools=tools_before, tokenize=False, chat_template=chat_template,
                                           add_generation_prompt=True)
    assert whole.startswith(prompt), (prompt[-200:], whole[-300:])
    reply = whole[len(prompt):]
    for end in ends:
        reply = reply.split(end)[0]
    return reply


@pytest.mark.parametrize("name, fmt, ends", [("llama-3.2", llama3, ("<|eot_id|>",)),
                                             ("qwen2.5", hermes, ("<|im_end|>",)),
                                             ("mistral-nemo", mistral, ("</s>",)),
                                             ("smollm2", generic, ("<|im_end|>",))])
def test_each_format_reads_back_the_calls_its_template_renders(tokenizer, name, fmt, ends):
    chat_template = tokenizer.chat_template if name == "smollm2" else template(name)
    reply = _rendered_reply(tokenizer, chat_template, fmt, ends)
    content, calls = fmt.parse(reply.strip())
    assert content is None and len(calls) == 1, reply
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    # and the result goes back as the family expects
    with_result = ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    messages, tools = fmt.for_template(with_result, [WEATHER])
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=chat_template,
                                         add_generation_prompt=True)
    assert "18 C" in text
    if fmt is llama3:
        assert "<|start_header_id|>ipython<|end_header_id|>" in text


@pytest.mark.parametrize("fmt, text", [
    (llama3, '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    (hermes, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    (mistral, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    (generic, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}')])
def test_each_formats_grammar_takes_its_own_calls_and_refuses_others(tokenizer, fmt, text):
    from backends.constraints import Grammars

    grammars = Grammars(tokenizer, 49152, [2])

    def complete(grammar, reply):
        matcher = grammars.matcher(grammar)
        tokens = tokenizer.encode(reply, add_special_tokens=False)
        if matcher.valid_prefix(tokens) != len(tokens):
            return False
        for token in tokens:
            matcher.advance(token)
        return bool(matcher.allowed()[2])  # EOS may follow

    required = fmt.grammar([WEATHER], "required", parallel=False)
    assert complete(required, text)
    assert not complete(required, text.replace("get_weather", "get_time"))
    assert not complete(required, "It is sunny.")
    assert fmt.parse(text)[1][0]["function"]["name"] == "get_weather"
    if fmt is not generic:  # "auto": text is free, until the call's start
        assert complete(fmt.grammar([WEATHER], "auto"), "It is sunny.")
    else:
        assert complete(fmt.grammar([WEATHER], "auto"), '{"response": "It is sunny."}')
        assert fmt.parse('{"response": "It is sunny."}') == ("It is sunny.", [])


def _served(backend, chat_template=None):
    from billion.server.app import create_app
    from tests.test_serve import Server

    if chat_template is not None:  # a copy of the engine with another template, the model shared
        backend = copy.copy(backend)
        backend.tokenizer = copy.deepcopy(backend.tokenizer)
        backend.tokenizer.chat_template = chat_template
    return Server(create_app({"smollm2": backend}))


@pytest.mark.parametrize("name", ["smollm2", "llama-3.2", "qwen2.5", "mistral-nemo"])
def test_the_real_model_calls_a_tool_in_its_templates_format(real_model, name):
    """SmolLM2's weights with its own template (no tools: the generic format) and with Llama 3.2's,
    Qwen2.5's and Mistral Nemo's (their formats): tool_choice required gives a valid call through
    the OpenAI client, streamed the same."""
    server = _served(real_model("torch"), None if name == "smollm2" else template(name))
    try:
        engine = next(iter(server.app.state.engines.values()))
        assert engine.tool_format is {"smollm2": generic, "llama-3.2": llama3, "qwen2.5": hermes,
                                      "mistral-nemo": mistral}[name]
        kw = dict(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                  max_tokens=32, temperature=0)
        r = server.client.chat.completions.create(**kw)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, r
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
        if name in ("smollm2", "llama-3.2"):  # streamed: the generic format holds the reply whole, llama3 a trigger
            events = list(server.client.chat.completions.create(stream=True, **kw))
            streamed = [c for e in events for c in (e.choices[0].delta.tool_calls or [])]
            assert streamed[0].function.name == "get_weather"
            assert "".join(c.function.arguments for c in streamed) == call.function.arguments
    finally:
        server.stop()
