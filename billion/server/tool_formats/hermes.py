"""The Hermes format (`<tool_call>` tags), whose sides live in billion/server/tools.py (the first
format billion parsed; its tests read them there)."""

from __future__ import annotations

from billion.server import tools

NAME = "hermes"
CALL_START = tools.CALL_START


def template_problem(chat_template: str | None) -> str | None:
    return tools.template_error(chat_template)


def for_template(messages: list[dict], tool_list: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    return tools.messages_for_template(messages), tool_list


grammar = tools.grammar
parse = tools.parse


def stream() -> tools.ToolStream:
    return tools.ToolStream(parse)
