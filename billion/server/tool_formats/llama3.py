"""The Llama 3 JSON format: Llama 3.1-3.3 and Llama 3.2-1B/3B-Instruct are taught by their chat
template (tools listed in the first user message, results in the `ipython` role) to call a tool by
replying with the call alone:

    {"name": "get_weather", "parameters": {"city": "Paris"}}

one call a turn (Meta's template refuses an assistant message with several). vLLM's
`llama3_json` parser reads the same; `<|python_tag|>` (Llama 3.1's built-in tools) is skipped."""

from __future__ import annotations

import json

from backends import constraints
from billion.server import tools

NAME = "llama3-json"
TRIGGER = '{"name": "'
PYTHON_TAG = "<|python_tag|>"


def template_problem(chat_template: str | None) -> str | None:
    if not chat_template or "tools" not in chat_template:
        return "this model's chat template does not render tools (needed for `tools` in the llama3-json format)"
    return None


def for_template(messages: list[dict], tool_list: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    return tools.messages_for_template(messages), tool_list  # the template renders calls and results


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal takes JSON's escapes


def grammar(tool_list: list[dict], choice="auto", parallel: bool = True, tokenizer=None) -> str | None:
    """One call, `{"name": N, "parameters": {...}}`, N one of the tools (tool_choice's, when named):
    the whole reply for "required" and a named function; for "auto" any text, until the model
    writes `{"name": "`, from which only a call may follow (a lazy rule, as hermes' trigger).
    `parallel` does not apply: the format has one call a turn."""
    chosen = tools.chosen(tool_list, choice)
    if chosen is None:
        return None
    rest = [f"{_lark_string(json.dumps(name)[1:] + ', ' + json.dumps('parameters') + ': ')} %json "
            f"{constraints.schema_text({'x-guidance': tools.JSON_STYLE, **parameters})} " + _lark_string("}")
            for name, parameters in chosen.items()]
    if choice == "auto":
        head = ["start: TEXT | call", f"call_start[lazy]: TEXT {_lark_string(TRIGGER)}", r"TEXT: /(.|\n)*/"]
    else:
        head = ["start: call", f"call_start: {_lark_string(TRIGGER)}"]
    return constraints.lark("\n".join(["%llguidance {}", *head, "call: call_start call_rest",
                                       "call_rest: " + " | ".join(rest)]) + "\n", "the tools' grammar")


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, calls): the text before the call (None if nothing), and the call(s) (several
    separated by ";" as vLLM reads them). A reply that is not calls from the first `{"name"` on
    (or that ends inside one, cut by max_tokens) is content as it stands."""
    body = text.replace(PYTHON_TAG, "", 1) if text.lstrip().startswith(PYTHON_TAG) else text
    start = body.find(TRIGGER)
    if start < 0:
        return text, []
    decoder, calls, at = json.JSONDecoder(), [], start
    while at < len(body):
        try:
            call, at = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return text, []
        if isinstance(call, dict) and "parameters" in call:  # Meta's name for the arguments
            call = {"name": call.get("name"), "arguments": call["parameters"]}
        if not tools.is_call(call):
            return text, []
        calls.append(tools.openai_call(call["name"], call["arguments"]))
        while at < len(body) and body[at] in " \n\t;":
            at += 1
    return body[:start].strip() or None, calls


def stream() -> tools.ToolStream:
    return tools.ToolStream(parse, triggers=(TRIGGER,))
