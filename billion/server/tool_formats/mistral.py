"""The Mistral format: Mistral 7B Instruct v0.3, Mistral Nemo and their kin are taught by their chat
template (tools in [AVAILABLE_TOOLS], results in [TOOL_RESULTS]) to call tools by writing

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

Their templates demand call ids of 9 letters or digits, so OpenAI's ids (call_...) are mapped to
such ids, the same one for a call and for its result.

`[TOOL_CALLS]` is one special token in Mistral's tokenizers, and the model was taught to write
that token, not the text in pieces: the grammar holds it to that token where the tokenizer has it
(trigger_token), and to the text `[TOOL_CALLS]` where it has not (another model served with
--tool-format mistral). Detokenizing skips special tokens, so the token leaves no text: the reply
reads `[{"name": ...}]`, and the calls are found at `[{"name"` (CALLS_START), which the grammar
forces right after the trigger and keeps out of the free text before it, as it keeps
`[TOOL_CALLS]` written as text."""

from __future__ import annotations

import hashlib
import json
import re

from backends import constraints
from billion.server import tools

NAME = "mistral"
TRIGGER = "[TOOL_CALLS]"
CALLS_START = '[{"name"'  # how the grammar's array of calls begins (tools.JSON_STYLE: no whitespace)
# free text before the calls: it holds neither of their starts written as text
FREE_TEXT = rf"TEXT: /(.|\n)*/ & ~/(?s:.*)({re.escape(TRIGGER)}|{re.escape(CALLS_START)})(?s:.*)/"


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


def trigger_token(tokenizer) -> int | None:
    """The id of `[TOOL_CALLS]` where `tokenizer` has it as one special token (Mistral's), else None."""
    if tokenizer is None:
        return None
    token = tokenizer.convert_tokens_to_ids(TRIGGER)
    special = getattr(tokenizer, "added_tokens_decoder", {}).get(token)
    # (an unknown token converts to the unknown token's id: its text tells them apart)
    return token if special is not None and special.special and special.content == TRIGGER else None


def grammar(tool_list: list[dict], choice="auto", parallel: bool = True, tokenizer=None) -> str | None:
    """`[TOOL_CALLS]` and a JSON array of calls (one when not parallel): the whole reply for
    "required" and a named function; for "auto", free text until the model writes `[TOOL_CALLS]`.
    The trigger is the tokenizer's special token where it has one (llguidance names it by id,
    `<[id]>`; free text ends at it), else the text, which a lazy rule waits for. The free text may
    not hold `[TOOL_CALLS]` or CALLS_START written as text, so what parse finds is the grammar's calls."""
    chosen = tools.chosen(tool_list, choice)
    if chosen is None:
        return None
    call = tools.call_schema(chosen)
    calls = {"x-guidance": tools.JSON_STYLE, "type": "array", "items": call, "minItems": 1,
             **({} if parallel else {"maxItems": 1})}
    token = trigger_token(tokenizer)
    trigger = json.dumps(TRIGGER) if token is None else f"<[{token}]>"
    if choice != "auto":
        head = ["start: calls", f"call_start: {trigger}"]
    elif token is None:  # a lazy rule cannot hold a special token, and text needs one to end at
        head = ["start: TEXT | calls", f"call_start[lazy]: TEXT {trigger}", FREE_TEXT]
    else:
        head = ["start: TEXT | TEXT calls", f"call_start: {trigger}", FREE_TEXT]
    rules = ["%llguidance {}", *head, f"calls: call_start %json {constraints.schema_text(calls)}"]
    return constraints.lark("\n".join(rules) + "\n", "the tools' grammar")


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, calls): the text before the calls (None if nothing) and the calls in the array
    after `[TOOL_CALLS]` written as text, or at CALLS_START where the special token left no text;
    a reply that is not such an array (or ends inside it) is content as it stands."""
    start = min((at for at in (text.find(TRIGGER), text.find(CALLS_START)) if at >= 0), default=-1)
    if start < 0:
        return text, []
    at = start + len(TRIGGER) if text.startswith(TRIGGER, start) else start
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
    """Calls start at `[TOOL_CALLS]` as text, or at CALLS_START where it was the special token."""
    return tools.ToolStream(parse, triggers=(TRIGGER, CALLS_START))
