"""Tool calls (OpenAI's `tools`/`tool_choice`) in the Hermes format, as pure functions.

The models billion serves with tools (Qwen2.5, SmolLM3, Hermes, and SmolLM2 with billion's
data/chatml_tools.jinja) are taught by their chat templates to call a tool by writing

    <tool_call>
    {"name": "weather", "arguments": {"city": "Paris"}}
    </tool_call>

so this module holds that format's four sides: whether a chat template renders tools in it
(template_error), the grammar that makes a model's calls valid for the request's tools (grammar:
a small model misspells names and drops arguments otherwise), the reply read back as content and
OpenAI-shaped calls (parse, and ToolStream while streaming), and a request's history turned into
what the templates expect (messages_for_template). Nothing here touches an engine.
"""

from __future__ import annotations

import json
import re
import secrets

from backends import constraints
from backends.text_stream import StopText
from backends.types import UserError

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
# The JSON between the tags as the templates write it (`tojson`: ", " and ": ", no other
# whitespace): a small model given room for whitespace tends to spend its tokens on it.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# a tool declared without parameters takes none (an empty schema would let a model invent some)
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_WHITESPACE = re.compile(r"\s*")


# ---------------------------------------------------------------- the chat template


def template_error(chat_template: str | None) -> str | None:
    """Why a model with this chat template cannot take `tools` (the 400's message), or None if it
    can: the template must render the tools and teach the <tool_call> format parse() reads."""
    remedy = "serve it with --chat-template FILE (billion ships chatml-tools, for ChatML models such as SmolLM2)"
    if not chat_template or "tools" not in chat_template:
        return f"this model's chat template does not render tools (needed for `tools`); {remedy}"
    if CALL_START not in chat_template:
        return (f"this model's chat template renders tools, but not in the {CALL_START} format "
                f"billion parses; {remedy}")
    return None


# ---------------------------------------------------------------- the grammar


def signatures(tools: list[dict]) -> dict[str, dict]:
    """Each tool's name -> the JSON schema of its arguments, from OpenAI's
    [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    found: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise UserError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                            f'"parameters": ...}}}}')
        name = function["name"]
        if name in found:
            raise UserError(f"two tools are named {name!r}")
        found[name] = function.get("parameters") or NO_PARAMETERS
    return found


def grammar(tools: list[dict], choice="auto", parallel: bool = True, tokenizer=None) -> str | None:
    """The Lark grammar (llguidance's dialect) that a reply to a request with these tools must
    follow, or None for tool_choice "none" (a free reply):
    - "auto": any text, but once the model writes <tool_call> only calls of these tools may follow
      (a lazy rule: the text is free until the trigger appears);
    - "required": one or more calls, from the first token;
    - {"type": "function", "function": {"name": N}}: calls of N only, from the first token.
    parallel=False (parallel_tool_calls: false): one call at most, then EOS.
    Each chosen tool's parameters are checked alone first, so a schema llguidance cannot enforce
    is refused naming its tool."""
    chosen_tools = chosen(tools, choice)
    if chosen_tools is None:
        return None
    return constraints.lark(_lark(chosen_tools, lazy=choice == "auto", parallel=parallel), "the tools' grammar")


def chosen(tools: list[dict], choice="auto") -> dict[str, dict] | None:
    """The tools a reply may call under `choice` (name -> parameters' schema; every format's
    grammar starts here), None for "none"; each schema is checked alone first, so one that
    llguidance cannot enforce is refused naming its tool."""
    available = signatures(tools)
    if choice == "none":
        return None
    if choice in ("auto", "required"):
        picked = available
    else:
        name = _named_function(choice)
        if name not in available:
            raise UserError(f"tool_choice names the function {name!r}, which is not among the tools")
        picked = {name: available[name]}
    for name, parameters in picked.items():
        constraints.json_schema(parameters, f"the parameters of tool {name!r}")
    return picked


def _named_function(choice) -> str:
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise UserError('tool_choice must be "none", "auto", "required" or '
                        '{"type": "function", "function": {"name": ...}}')
    return function["name"]


def call_schema(chosen: dict[str, dict]) -> dict:
    """One call, {"name", "arguments"}, of one of the chosen tools: an object per tool, told apart
    by the name's const (llguidance takes anyOf). The hermes, mistral and generic formats share it."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for name, parameters in chosen.items()]}


def _lark(chosen: dict[str, dict], lazy: bool, parallel: bool) -> str:
    call = {"x-guidance": JSON_STYLE, **call_schema(chosen)}
    if lazy:
        # TEXT ends at the trigger's first occurrence; EOS is allowed after any text or any call
        head = ["start: TEXT | calls", f'call_start[lazy]: TEXT "{CALL_START}"', r"TEXT: /(.|\n)*/"]
    else:
        head = ["start: calls", f'call_start: "{CALL_START}"']
    more = rf' (("\n")? "{CALL_START}" call_body)*' if parallel else ""
    return "\n".join(["%llguidance {}", *head, "calls: call_start call_body" + more,
                      rf'call_body: "\n" %json {constraints.schema_text(call)} "\n{CALL_END}"']) + "\n"


# ---------------------------------------------------------------- the reply


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, calls in OpenAI's shape) of a reply. With calls, the content is the text before
    the first <tool_call>, stripped (None if nothing is left); a last call cut off by max_tokens is
    dropped (the finish reason says "length"), as vLLM's Hermes parser does. A reply with no
    complete calls, or with anything else among them, is content as it stands, with no calls."""
    start = text.find(CALL_START)
    calls = _calls(text[start:]) if start >= 0 else None
    if not calls:
        return text, []
    return text[:start].strip() or None, calls


def _calls(tail: str) -> list[dict] | None:
    """The calls in `tail` (from the first <tool_call> on), or None unless it is only calls.
    Each body is read with raw_decode, so a "<tool_call>" inside an argument string is no tag."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(tail):
        if not tail.startswith(CALL_START, at):
            return None
        if CALL_END not in tail[at:]:  # the reply ends inside this call
            return calls or None
        try:
            body, at = decoder.raw_decode(tail, _skip_space(tail, at + len(CALL_START)))
        except json.JSONDecodeError:
            return None
        at = _skip_space(tail, at)
        if not tail.startswith(CALL_END, at) or not is_call(body):
            return None
        calls.append(openai_call(body["name"], body["arguments"]))
        at = _skip_space(tail, at + len(CALL_END))
    return calls


def _skip_space(text: str, at: int) -> int:
    return _WHITESPACE.match(text, at).end()


def is_call(body) -> bool:
    """{"name": text, "arguments": object}: one call, as every format's parser reads it."""
    return isinstance(body, dict) and isinstance(body.get("name"), str) and isinstance(body.get("arguments"), dict)


def openai_call(name: str, arguments: dict) -> dict:
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ToolStream:
    """A streamed reply's content, sent as it comes, and its calls, read at the end. Text that
    could be the start of the trigger (<tool_call>; a format's own, llama3.py's) is held back; from
    the trigger on nothing is content (the calls are sent whole by finish), unless the reply ends
    inside a call. `read`: how the reply from the trigger on is parsed (content, calls); `triggers`:
    the texts any of which starts the calls."""

    def __init__(self, read=None, triggers: tuple[str, ...] = (CALL_START,)):
        self._read = read or parse
        self._trigger = StopText(triggers)
        self._tail: str | None = None  # the reply from the first trigger on, once it appears

    def push(self, piece: str) -> str:
        """The content that can be sent now."""
        if self._tail is not None:
            self._tail += piece
            return ""
        text = self._trigger.held + piece
        content, hit = self._trigger.push(piece)
        if hit:
            self._tail = text[len(content):]
        return content

    def finish(self) -> tuple[str, list[dict]]:
        """(the content still to send, the calls) at the end of the reply."""
        if self._tail is None:
            return self._trigger.flush(), []
        content, calls = self._read(self._tail)
        return content or "", calls


# ---------------------------------------------------------------- the history


def messages_for_template(messages: list[dict]) -> list[dict]:
    """OpenAI's chat messages as the Hugging Face templates expect them: an assistant's
    tool_calls carry their arguments as an object (OpenAI sends JSON text), and a message with no
    content has "" (templates concatenate it). Tool messages (tool_call_id, content) pass as they are."""
    return [_for_template(i, message) for i, message in enumerate(messages)]


def _for_template(index: int, message: dict) -> dict:
    out = {**message, "content": "" if message.get("content") is None else message["content"]}
    if message.get("tool_calls"):
        out["tool_calls"] = [_call_for_template(index, call) for call in message["tool_calls"]]
    return out


def _call_for_template(index: int, call: dict) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise UserError(f'messages[{index}].tool_calls: each call must be {{"function": {{"name": ..., '
                        f'"arguments": ...}}}}')
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise UserError(f"messages[{index}]: the arguments of the call to {function['name']!r} are "
                            f"not valid JSON ({e})") from None
    if not isinstance(arguments, dict):
        raise UserError(f"messages[{index}]: the arguments of the call to {function['name']!r} must be "
                        f"a JSON object")
    return {**call, "function": {**function, "arguments": arguments}}
