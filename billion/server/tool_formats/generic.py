"""The generic format, for chat templates that render no tools (llama.cpp's idea, its "generic"
handler): the tools are described in the system message, and the whole reply is constrained to
one JSON object, either calls or an answer:

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    {"response": "It is sunny."}

Earlier calls are rendered in the same JSON as the assistant's turns, and tool results as a user
turn, so any template (one that alternates user and assistant strictly, too) can hold the history.
The answer's text is known only once the JSON is complete, so a streamed reply's content comes
at its end."""

from __future__ import annotations

import json

from backends import constraints
from billion.server import tools

NAME = "generic"
INTRO = ("You can call the following tools. Each is described by a JSON schema of its arguments:\n{tools}\n\n"
         'To call tools, reply with JSON only: {{"tool_calls": [{{"name": <tool name>, "arguments": '
         '<arguments object>}}]}}. To answer without a tool, reply {{"response": <your answer>}}.')


def template_problem(chat_template: str | None) -> str | None:
    return None  # any template: the tools go in as text


def _describe(tool_list: list[dict]) -> str:
    return INTRO.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tool_list))


def for_template(messages: list[dict], tool_list: list[dict] | None) -> tuple[list[dict], None]:
    """Plain messages for any template: calls as the assistant's JSON, consecutive tool results
    one user turn, and the tools' description in the system message."""
    out: list[dict] = []
    for message in tools.messages_for_template(messages):
        if message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
        elif message["role"] == "tool":
            result = f"Tool result ({message.get('tool_call_id') or 'call'}): {message['content']}"
            if out and out[-1].get("tool_result"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_result": True})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    out = [{k: v for k, v in m.items() if k != "tool_result"} for m in out]
    if tool_list:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + _describe(tool_list)}
        else:
            out.insert(0, {"role": "system", "content": _describe(tool_list)})
    return out, None


def grammar(tool_list: list[dict], choice="auto", parallel: bool = True, tokenizer=None) -> str | None:
    """The reply as one JSON object: {"tool_calls": [...]} (one call at most when not parallel),
    or for "auto" {"response": "..."} as well."""
    chosen = tools.chosen(tool_list, choice)
    if chosen is None:
        return None
    call = tools.call_schema(chosen)
    calls = {"type": "object", "additionalProperties": False, "required": ["tool_calls"], "properties": {
        "tool_calls": {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}}}
    answer = {"type": "object", "additionalProperties": False, "required": ["response"],
              "properties": {"response": {"type": "string"}}}
    schema = {"x-guidance": tools.JSON_STYLE, **({"anyOf": [calls, answer]} if choice == "auto" else calls)}
    return constraints.lark(f"%llguidance {{}}\nstart: %json {constraints.schema_text(schema)}\n", "the tools' grammar")


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, calls) of the reply's JSON; a reply that is neither form is content as it stands."""
    try:
        reply = json.loads(text)
    except json.JSONDecodeError:
        return text, []
    if (isinstance(reply, dict) and isinstance(reply.get("tool_calls"), list) and reply["tool_calls"]
            and all(map(tools.is_call, reply["tool_calls"]))):
        return None, [tools.openai_call(c["name"], c["arguments"]) for c in reply["tool_calls"]]
    if isinstance(reply, dict) and isinstance(reply.get("response"), str):
        return reply["response"], []
    return text, []


class _Whole:
    """The reply held until its end, then read whole."""

    def __init__(self):
        self.text = ""

    def push(self, piece: str) -> str:
        self.text += piece
        return ""

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = parse(self.text)
        return content or "", calls


def stream() -> _Whole:
    return _Whole()
