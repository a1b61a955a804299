"""OpenAI's Responses API (`/v1/responses`): what the OpenAI SDK's newer examples, the Agents SDK's
default model and Codex-style tools call. A thin translation, as messages.py is for Anthropic's: the
request becomes a Chat Completions request (`instructions`, `input` as text or items: messages,
`function_call`, `function_call_output`; function `tools`, `tool_choice`, `text.format`), which
the server prepares, constrains and runs as any other; the generation's chunks are rendered as a
Response object, or streamed as the API's semantic events in order (response.created,
response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta ... done, response.function_call_arguments.delta ... done,
response.output_item.done, response.completed or response.incomplete).

Nothing is stored: `store: true` and `previous_response_id` are refused with a 400 that says so
(send the whole conversation in `input`), as are the other fields billion does not honour
(built-in tools, reasoning, background, include, truncation "auto", max_tool_calls, images).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from billion.server.answers import Reply, collected, respond, shown
from billion.server.errors import APIError, gone, stream_error
from billion.server.prompts import prepared
from billion.server.requests import ChatRequest, chat_request, json_object, refuse_unsupported, validated

router = APIRouter()

# fields that change what a response is, each with its "off" values; anything else is a 400
UNSUPPORTED = {
    "background": lambda v: v in (None, False),
    "reasoning": lambda v: v is None,
    "include": lambda v: not v,
    "truncation": lambda v: v in (None, "disabled"),
    "max_tool_calls": lambda v: v is None,
    "conversation": lambda v: v is None,
    "prompt": lambda v: v is None,
}
STORED = {"store": lambda v: v in (None, False), "previous_response_id": lambda v: v is None}  # nothing is


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: Union[str, list[dict]]
    instructions: str | None = None
    tools: list[dict] | None = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None
    text: dict | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    metadata: dict | None = None


def _parse(raw: bytes) -> ResponsesRequest:
    body = json_object(raw)
    refuse_unsupported(body, STORED, "by this server (billion); nothing is stored: send the whole conversation in input")
    refuse_unsupported(body, UNSUPPORTED)
    return validated(body, ResponsesRequest)


# ---------------------------------------------------------------- the request, as Chat Completions


def _content(content, where: str) -> str:
    """A message's text: a string, or input_text / output_text parts (images are refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be text or a list of parts", param=where)
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise APIError(400, f"{where}: {kind} parts are not supported by this server (billion): text only",
                           param=where)
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _messages(req: ResponsesRequest) -> list[dict]:
    """instructions and input as Chat Completions messages: consecutive function_call items are one
    assistant message's tool calls, a function_call_output a tool message."""
    out = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role") in ("user", "system", "developer", "assistant"):
            out.append({"role": item["role"], "content": _content(item.get("content", ""), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else _content(output, where)})
        else:
            raise APIError(400, f"{where}: {kind} items are not supported by this server (billion)", param=where)
    return out


def _tools(tools_: list[dict] | None) -> list[dict] | None:
    if not tools_:
        return None
    out = []
    for i, tool in enumerate(tools_):
        if tool.get("type") != "function":
            raise APIError(400, f"tools.{i}: {tool.get('type')} tools are not supported by this server (billion): "
                                f"function tools only", param=f"tools.{i}")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                          "strict") if tool.get(k) is not None}})
    return out


def _tool_choice(choice) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise APIError(400, f"tool_choice {choice.get('type')!r} is not supported by this server (billion)",
                           param="tool_choice")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return fmt  # json_object, or a type the chat route refuses by name


def as_chat(req: ResponsesRequest, engines: dict, limits) -> ChatRequest:
    body = {"model": req.model, "messages": _messages(req), "max_tokens": req.max_output_tokens,
            "stream": req.stream, "tools": _tools(req.tools), "tool_choice": _tool_choice(req.tool_choice),
            "parallel_tool_calls": req.parallel_tool_calls, "response_format": _response_format(req.text),
            "temperature": 1.0 if req.temperature is None else req.temperature, "top_p": req.top_p}
    return chat_request(body, engines, limits)


# ---------------------------------------------------------------- the route


@router.post("/v1/responses")
async def responses(request: Request):
    asked: list[ResponsesRequest] = []  # the request as sent: its fields are echoed in the Response

    def parse(raw: bytes, engines: dict, limits) -> ChatRequest:
        asked.append(_parse(raw))
        return as_chat(asked[0], engines, limits)

    req, engine, prompt_ids, gen = await prepared(request, parse)
    shape = _Shape(asked[0])
    return await respond(request, req, engine, prompt_ids, gen, shape.answer, shape.events)


# ---------------------------------------------------------------- the answer


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class _Shape:
    """One request's Response object and events (the request's own fields are echoed in it)."""

    def __init__(self, asked: ResponsesRequest):
        self.asked = asked
        self.id, self.created = _id("resp"), int(time.time())
        self.message_id = _id("msg")

    def response(self, reply: Reply, status: str, output: list) -> dict:
        asked = self.asked
        incomplete = status == "incomplete"
        body = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": asked.model, "output": output, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": asked.instructions, "max_output_tokens": asked.max_output_tokens,
                "parallel_tool_calls": asked.parallel_tool_calls is not False,
                "previous_response_id": None, "store": False, "metadata": asked.metadata or {},
                "temperature": 1.0 if asked.temperature is None else asked.temperature,
                "top_p": 1.0 if asked.top_p is None else asked.top_p,
                "tool_choice": asked.tool_choice or "auto", "tools": asked.tools or [],
                "text": asked.text or {"format": {"type": "text"}}, "truncation": "disabled", "usage": None}
        if status != "in_progress":
            n_in, n_out = len(reply.prompt_ids), reply.tokens
            body["usage"] = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": reply.cached},
                             "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": n_in + n_out}
        return body

    def message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}

    @staticmethod
    def call_item(call: dict) -> dict:
        return {"type": "function_call", "id": _id("fc"), "call_id": call["id"], "name": call["function"]["name"],
                "arguments": call["function"]["arguments"], "status": "completed"}

    @staticmethod
    def status(reply: Reply) -> str:
        return "incomplete" if reply.reason in ("max_tokens", "max_time") else "completed"

    async def answer(self, replies: list[Reply]) -> JSONResponse:
        reply = replies[0]
        text = await collected(reply)
        if text is None:
            return gone()
        content, calls = reply.tool_format.parse(text) if reply.calls_tools else (text, [])
        output = ([self.message(content)] if content or not calls else []) + [self.call_item(c) for c in calls]
        return JSONResponse(self.response(reply, self.status(reply), output))

    async def events(self, request: Request, replies: list[Reply]) -> AsyncIterator[str]:
        reply = replies[0]
        sequence = 0

        def sse(kind: str, **data) -> str:
            nonlocal sequence
            sequence += 1
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': sequence - 1, **data})}\n\n"

        output: list[dict] = []
        text: list[str] = []
        opened = False  # the message item (and its one output_text part) has been announced
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}

        def delta(piece: str):
            nonlocal opened
            if not opened:
                opened = True
                yield sse("response.output_item.added", output_index=0, item=self.message("", "in_progress"))
                yield sse("response.content_part.added", **where,
                          part={"type": "output_text", "text": "", "annotations": []})
            text.append(piece)
            yield sse("response.output_text.delta", **where, delta=piece)

        try:
            start = self.response(reply, "in_progress", [])
            yield sse("response.created", response=start)
            yield sse("response.in_progress", response=start)
            async for piece in shown(reply):
                for event in delta(piece):
                    yield event
            if reply.gone:
                return
            if opened:
                done = "".join(text)
                yield sse("response.output_text.done", **where, text=done)
                yield sse("response.content_part.done", **where,
                          part={"type": "output_text", "text": done, "annotations": []})
                output.append(self.message(done))
                yield sse("response.output_item.done", output_index=0, item=output[-1])
            for call in reply.calls:
                index, item = len(output), self.call_item(call)
                yield sse("response.output_item.added", output_index=index, item={**item, "arguments": "",
                                                                                 "status": "in_progress"})
                yield sse("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=item["arguments"])
                yield sse("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          arguments=item["arguments"])
                output.append(item)
                yield sse("response.output_item.done", output_index=index, item=item)
            status = self.status(reply)
            yield sse("response.completed" if status == "completed" else "response.incomplete",
                      response=self.response(reply, status, output))
        except Exception as e:  # the status line is sent: the failure is an event
            err = stream_error(request, e)
            yield sse("error", code=err.code, message=err.message, param=err.param)
        finally:
            await reply.close()
