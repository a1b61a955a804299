"""The Mistral format: Mistral 7B Instruct v0.3, Mistral Nemo and their kin are taught by their chat
template (tools in [AVAILABLE_TOOLS], results in [TOOL_RESULTS]) to call tools by writing

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

Their templates demand call ids of 9 letters or digits, so OpenAI's ids (call_...) are mapped to
such ids, the same one for a call and for its result. `[TOOL_CALLS]` is a special token in
Mistral's tokenizers: the grammar spells it as text (which any tokenizer can write and which
detokenizing keeps), so a Mistral model is held to writing it that way."""

from __future__ import annotations

import hashlib
import json

from backends import constraints
from billion.server import tools

NAME = "mistral"
TRIGGER = "[TOOL_CALLS]"


def template_problem(chat_template: str | None) -> str | None:
    if not chat_template or TRIGGER not in chat_template:
        return f"this model's chat template does not render tools in the {TRIGGER} format"
    return None


def _short_id(call_id: str | None) -> str:
    """A 9-character id (letters and digits) for an OpenAI call id, always the same one."""
    return hashlib.sha1(str(call_id).encode()).hexdigest()[:9]


def for_template(messages: list[dict], tool_list: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    out = []
    for message in tools.messages_for_template(messages):
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [{**c, "id": _short_id(c.get("id"))} for c in message["tool_calls"]]}
        if message.get("role") == "tool":
            message = {**message, "tool_call_id": _short_id(message.get("tool_call_id"))}
        out.append(message)
    return out, tool_list


def grammar(tool_list: list[dict], choice="auto", parallel: bool = True) -> str | None:
    """`[TOOL_CALLS]` and a JSON array of calls (one when not parallel): the whole reply for
    "required" and a named function; for "auto", text until the model writes `[TOOL_CALLS]`."""
    chosen = tools.chosen(tool_list, choice)
    if chosen is None:
        return None
    call = tools.call_schema(chosen)
    calls = {"x-guidance": tools.JSON_STYLE, "type": "array", "items": call, "minItems": 1,
             **({} if parallel else {"maxItems": 1})}
    trigger = json.dumps(TRIGGER)
    if choice == "auto":
        head = ["start: TEXT | calls", f"call_start[lazy]: TEXT {trigger}", r"TEXT: /(.|\n)*/"]
    else:
        head = ["start: calls", f"call_start: {trigger}"]
    rules = ["%llguidance {}", *head, f"calls: call_start %json {constraints.schema_text(calls)}"]
    return constraints.lark("\n".join(rules) + "\n", "the tools' grammar")


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, calls): the text before [TOOL_CALLS] (None if nothing) and the calls in the array
    after it; a reply that is not such an array (or ends inside it) is content as it stands."""
    start = text.find(TRIGGER)
    if start < 0:
        return text, []
    at = start + len(TRIGGER)
    while at < len(text) and text[at].isspace():
        at += 1
    try:
        calls, _ = json.JSONDecoder().raw_decode(text, at)
    except json.JSONDecodeError:
        return text, []
    if not (isinstance(calls, list) and calls and all(map(tools.is_call, calls))):
        return text, []
    return text[:start].strip() or None, [tools.openai_call(c["name"], c["arguments"]) for c in calls]


def stream() -> tools.ToolStream:
    return tools.ToolStream(parse, trigger=TRIGGER)
