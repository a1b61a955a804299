"""Tool calls (billion/server/tools.py): the grammar enforced on the real SmolLM2 tokenizer, the
reply parsed whole and streamed, the history for the template, and billion's chatml_tools.jinja."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from backends.constraints import ConstraintError, Grammars
from backends.types import UserError
from billion.server import tools

WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock", "description": "The time now"}}  # no parameters
TOOLS = [WEATHER, CLOCK]


def call_text(name: str, arguments: dict) -> str:
    """A call as the template teaches it (json.dumps's separators, like `tojson`)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


PARIS = call_text("weather", {"city": "Paris"})


@pytest.fixture(scope="module")
def tokenizer(real_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_folder)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, 49152, [2])


def complete(grammars, tokenizer, grammar: str, text: str) -> bool:
    """Whether `text`'s tokens are all allowed by `grammar` and the reply may end (EOS) after them."""
    matcher = grammars.matcher(grammar)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    if matcher.valid_prefix(tokens) < len(tokens):
        return False
    for token in tokens:
        matcher.advance(token)
    return bool(matcher.allowed()[2])


# ---------------------------------------------------------------- the grammar


def test_required_takes_only_valid_calls(grammars, tokenizer):
    grammar = tools.grammar(TOOLS, "required")
    assert complete(grammars, tokenizer, grammar, PARIS)
    assert complete(grammars, tokenizer, grammar, PARIS + "\n" + call_text("clock", {}))
    assert not complete(grammars, tokenizer, grammar, call_text("wether", {"city": "Paris"}))
    assert not complete(grammars, tokenizer, grammar, call_text("weather", {"days": 2}))  # no city
    assert not complete(grammars, tokenizer, grammar, "Sure. " + PARIS)  # a call from the first token
    assert not complete(grammars, tokenizer, grammar, PARIS[:-3])  # unfinished: no EOS yet
    # the JSON is written exactly as the template writes it: no room for spending tokens on spaces
    assert not complete(grammars, tokenizer, grammar, '<tool_call>\n{"name":"weather","arguments":{"city":"P"}}'
                                                      "\n</tool_call>")


def test_auto_leaves_text_free_until_the_trigger(grammars, tokenizer):
    grammar = tools.grammar(TOOLS, "auto")
    assert complete(grammars, tokenizer, grammar, "Paris is sunny today.\nNo tool needed.")
    assert complete(grammars, tokenizer, grammar, "Let me look. " + PARIS)
    assert not complete(grammars, tokenizer, grammar, "Let me look. " + call_text("wether", {"city": "Paris"}))
    assert not complete(grammars, tokenizer, grammar, PARIS + " Done.")  # only calls after the trigger


def test_a_named_function_is_the_only_one_allowed(grammars, tokenizer):
    grammar = tools.grammar(TOOLS, {"type": "function", "function": {"name": "clock"}})
    assert complete(grammars, tokenizer, grammar, call_text("clock", {}))
    assert not complete(grammars, tokenizer, grammar, PARIS)
    assert not complete(grammars, tokenizer, grammar, call_text("clock", {"zone": "UTC"}))  # it has no parameters


def test_none_has_no_grammar():
    assert tools.grammar(TOOLS, "none") is None


def test_bad_tools_are_refused_naming_the_part():
    with pytest.raises(ConstraintError, match="the parameters of tool 'tags'.*uniqueItems"):
        tools.grammar([{"type": "function", "function": {"name": "tags", "parameters": {
            "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}])
    with pytest.raises(UserError, match="'sundial', which is not among the tools"):
        tools.grammar(TOOLS, {"type": "function", "function": {"name": "sundial"}})
    with pytest.raises(UserError, match="two tools are named 'weather'"):
        tools.grammar([WEATHER, WEATHER])
    with pytest.raises(UserError, match=r"tools\[1\] must be"):
        tools.grammar([WEATHER, {"type": "function", "function": {"description": "no name"}}])
    with pytest.raises(UserError, match="tool_choice must be"):
        tools.grammar(TOOLS, "always")


def test_template_error():
    assert tools.template_error(resources.files("billion").joinpath("data/chatml_tools.jinja").read_text()) is None
    assert "does not render tools" in tools.template_error(None)
    assert "does not render tools" in tools.template_error("{{ messages[0].content }}")
    assert "not in the <tool_call> format" in tools.template_error("{{ tools | tojson }}<|python_tag|>")


# ---------------------------------------------------------------- the reply


def test_parse_one_call():
    content, calls = tools.parse(PARIS)
    assert content is None
    assert [c["function"] for c in calls] == [{"name": "weather", "arguments": '{"city": "Paris"}'}]
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0]["id"]) and calls[0]["type"] == "function"


def test_parse_content_and_two_calls():
    content, calls = tools.parse("Let me check.\n" + PARIS + "\n" + call_text("clock", {}))
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["weather", "clock"]
    assert calls[0]["id"] != calls[1]["id"]


def test_a_tag_inside_an_argument_is_no_call():
    text = call_text("weather", {"city": "<tool_call> and </tool_call>"})
    assert json.loads(tools.parse(text)[1][0]["function"]["arguments"]) == {"city": "<tool_call> and </tool_call>"}


def test_a_last_call_cut_off_is_dropped():
    content, calls = tools.parse("Hm. " + PARIS + "\n" + PARIS[:20])
    assert content == "Hm." and [c["function"]["name"] for c in calls] == ["weather"]


@pytest.mark.parametrize("text", ["Just text.", PARIS[:-4],
                                  '<tool_call>\n{"name": "weather"}\n</tool_call>', PARIS + "\nDone.",
                                  PARIS + "\n" + call_text("clock", {}).replace("<tool_call>", "<toolcall>")])
def test_a_reply_without_complete_calls_is_content(text):
    assert tools.parse(text) == (text, [])


def stream(pieces: list[str]) -> tuple[list[str], str, list[dict]]:
    s = tools.ToolStream()
    sent = [s.push(piece) for piece in pieces]
    return sent, *s.finish()


def test_stream_holds_back_a_partial_trigger():
    sent, rest, calls = stream(["Let me", " check <tool", "_ca", "ll>\n", PARIS[len("<tool_call>\n"):]])
    assert sent == ["Let me", " check ", "", "", ""]
    assert rest == "" and [c["function"]["name"] for c in calls] == ["weather"]


def test_stream_releases_what_was_no_trigger():
    sent, rest, calls = stream(["a <tool", " is a tag", " <tool_"])
    assert sent == ["a ", "<tool is a tag", " "]
    assert (rest, calls) == ("<tool_", [])


def test_stream_cut_inside_a_call_ends_as_content():
    sent, rest, calls = stream(["Sure ", PARIS[:15]])
    assert "".join(sent) + rest == "Sure " + PARIS[:15] and calls == []


# ---------------------------------------------------------------- the history and the template


HISTORY = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain, 15 C"},
]


def test_messages_for_template():
    out = tools.messages_for_template(HISTORY)
    assert out[1]["content"] == ""
    assert [c["function"]["arguments"] for c in out[1]["tool_calls"]] == [{"city": "Paris"}, {"city": "Rome"}]
    assert out[1]["tool_calls"][0]["id"] == "call_1" and out[2] == HISTORY[2]
    assert HISTORY[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # not modified
    bad = [HISTORY[0], {"role": "assistant", "tool_calls": [{"function": {"name": "weather", "arguments": "{city"}}]}]
    with pytest.raises(UserError, match=r"messages\[1\].*'weather'.*not valid JSON"):
        tools.messages_for_template(bad)


@pytest.fixture(scope="module")
def template():
    return resources.files("billion").joinpath("data/chatml_tools.jinja").read_text()


def test_template_lists_the_tools(tokenizer, template):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                                           add_generation_prompt=True, tokenize=False, chat_template=template)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                             "Hugging Face\n\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n" + json.dumps(CLOCK) + "\n</tools>" in prompt
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in prompt
    assert prompt.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_template_renders_calls_and_results(tokenizer, template):
    prompt = tokenizer.apply_chat_template(tools.messages_for_template(HISTORY), tools=TOOLS,
                                           add_generation_prompt=True, tokenize=False, chat_template=template)
    rome = call_text("weather", {"city": "Rome"})
    assert prompt.endswith(f"<|im_start|>assistant\n{PARIS}\n{rome}<|im_end|>\n"
                           "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response>\n"
                           "<tool_response>\nrain, 15 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # what the template shows as a call is what the grammar takes and parse reads back
    assert tools.parse(PARIS + "\n" + rome)[1][1]["function"]["arguments"] == '{"city": "Rome"}'


def test_template_without_tools_is_smollm2s(tokenizer, template):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "bye"}]
    assert (tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=template)
            == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tokenizer.apply_chat_template(with_system, tokenize=False, chat_template=template).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>")


def test_serve_chat_template_option_reads_files_and_the_bundled_one(tmp_path):
    from billion.commands.serve import read_template

    assert "<tool_call>" in read_template("chatml-tools")
    with pytest.raises(UserError, match="cannot read the chat template"):
        read_template(str(tmp_path / "missing.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m.content }\n")
    with pytest.raises(UserError, match=r"bad.jinja:2: not a Jinja template"):
        read_template(str(bad))
