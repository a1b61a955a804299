"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): what the `anthropic` SDK and
Claude Code call. A thin translation: the request becomes a Chat Completions request (system,
content blocks, tool_use and tool_result, tools with input_schema, tool_choice, stop_sequences),
which the server prepares, constrains and runs as any other; the one stream of generation chunks is
rendered as Anthropic's message and its events (message_start, content_block_start/delta/stop,
message_delta, message_stop). Errors come in Anthropic's shape ({"type": "error", "error": ...},
errors.APIError, error_body), and `x-api-key` works as well as Bearer (access.py).

Not honoured, so refused with a 400 naming them: image and document blocks, extended thinking,
MCP servers, containers, server tools (web search and the like).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from billion.server.answers import Reply, collected, respond, shown
from billion.server.errors import APIError, gone, stream_error
from billion.server.prompts import chat_prompt, prepared
from billion.server.requests import ChatRequest, chat_request, json_object, read_body, refuse_unsupported, validated

router = APIRouter()

ERROR_PREFIX = "/v1/messages"  # errors under this path come in Anthropic's shape (error_body)
ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
STOP_REASON = {"eos": "end_turn", "stop": "stop_sequence", "max_tokens": "max_tokens", "max_time": "max_tokens",
               "tool_calls": "tool_use"}
UNSUPPORTED = {"thinking": lambda v: v in (None, {"type": "disabled"}), "mcp_servers": lambda v: not v,
               "container": lambda v: v is None}


class Block(BaseModel):
    """A content block: text, tool_use (an assistant's call) or tool_result (a user's answer to one)."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict | None = None
    tool_use_id: str | None = None
    content: Union[str, list[dict], None] = None


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    description: str | None = None
    input_schema: dict
    type: str | None = None  # "custom" or absent; server tools (web_search_...) are refused


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int = Field(ge=1)  # required, as Anthropic's API has it
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Union[str, list[Block], None] = None
    tools: list[AnthropicTool] | None = None
    tool_choice: dict | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False


class CountRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Union[str, list[Block], None] = None
    tools: list[AnthropicTool] | None = None


# ---------------------------------------------------------------- the request, as Chat Completions


def _parse(raw: bytes, model_cls):
    body = json_object(raw)
    refuse_unsupported(body, UNSUPPORTED)
    return validated(body, model_cls)


def _text(content) -> str:
    """A block's (or a tool result's) text; other kinds of content are refused."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for block in content:
        kind = block.type if isinstance(block, Block) else block.get("type")
        if kind != "text":
            raise APIError(400, f"{kind} content blocks are not supported by this server (billion): text only",
                           param="messages")
        parts.append(block.text if isinstance(block, Block) else block.get("text", ""))
    return "".join(parts)


def _messages(req: MessagesRequest | CountRequest) -> list[dict]:
    """Anthropic's system and messages as Chat Completions messages: a tool_use block is an
    assistant's tool call, a tool_result block a tool message answering it."""
    out = [{"role": "system", "content": _text(req.system)}] if req.system else []
    for message in req.messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        text, calls = [], []
        for block in message.content:
            if block.type == "text":
                text.append(block.text or "")
            elif block.type == "tool_use" and message.role == "assistant":
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": json.dumps(block.input or {})}})
            elif block.type == "tool_result" and message.role == "user":
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _text(block.content)})
            else:
                raise APIError(400, f"{block.type} blocks are not supported by this server (billion) in a "
                                    f"{message.role} message", param="messages")
        if calls:
            out.append({"role": "assistant", "content": "".join(text) or None, "tool_calls": calls})
        elif text:
            out.append({"role": message.role, "content": "".join(text)})
    return out


def _tools(tools_: list[AnthropicTool] | None) -> list[dict] | None:
    if not tools_:
        return None
    for tool in tools_:
        if tool.type not in (None, "custom"):
            raise APIError(400, f"server tools ({tool.type}) are not supported by this server (billion)",
                           param="tools")
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.input_schema}} for t in tools_]


def _tool_choice(choice: dict | None) -> tuple[Any, bool | None]:
    """(Chat Completions' tool_choice, parallel_tool_calls) of Anthropic's tool_choice."""
    if choice is None:
        return None, None
    parallel = False if choice.get("disable_parallel_tool_use") else None
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}, parallel
    if kind in ("auto", "any", "none"):
        return {"any": "required"}.get(kind, kind), parallel
    raise APIError(400, f"tool_choice.type must be auto, any, tool or none, not {kind!r}", param="tool_choice")


def as_chat(raw: bytes, engines: dict, limits) -> ChatRequest:
    """The Messages request as the Chat Completions request the server runs (every check of that
    route applies: the model, the context, the tools' schemas)."""
    req = _parse(raw, MessagesRequest)
    choice, parallel = _tool_choice(req.tool_choice)
    body = {"model": req.model, "messages": _messages(req), "max_tokens": req.max_tokens, "stream": req.stream,
            "tools": _tools(req.tools), "tool_choice": choice, "parallel_tool_calls": parallel,
            "stop": req.stop_sequences, "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": req.top_p, "top_k": req.top_k}
    return chat_request(body, engines, limits)


# ---------------------------------------------------------------- routes


@router.post("/v1/messages")
async def messages(request: Request):
    req, engine, prompt_ids, gen = await prepared(request, as_chat)
    return await respond(request, req, engine, prompt_ids, gen, _answer, _events)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request):
    """{"input_tokens"}: the prompt as /v1/messages would render it."""
    state = request.app.state
    raw = await read_body(request, state.limits.max_body_bytes)

    def count():
        req = _parse(raw, CountRequest)
        chat = chat_request({"model": req.model, "messages": _messages(req), "tools": _tools(req.tools)},
                            state.engines, state.limits)
        engine = state.engines[chat.model]
        with engine.prep_lock:
            return {"input_tokens": len(chat_prompt(chat, engine.prep, engine.tool_format)[0])}

    return await run_in_threadpool(count)


# ---------------------------------------------------------------- the answer


def error_body(e: APIError) -> dict:
    """An error in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
    kind = ERRORS.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def _usage(reply: Reply, output_tokens: int | None = None) -> dict:
    return {"input_tokens": len(reply.prompt_ids), "output_tokens": reply.tokens if output_tokens is None
            else output_tokens, "cache_read_input_tokens": reply.cached}


def _tool_use(call: dict) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"])}


def _stop(reply: Reply) -> str:
    return STOP_REASON.get(reply.reason, "end_turn")


def _stop_sequence(reply: Reply) -> str | None:
    """The stop sequence that ended the reply (None when something else did)."""
    stops = reply.generation.request.output.text.stop
    return stops.matched if reply.reason == "stop" and stops is not None else None


async def _answer(replies: list[Reply]) -> JSONResponse:
    reply = replies[0]
    text = await collected(reply)
    if text is None:
        return gone()
    content, calls = reply.tool_format.parse(text) if reply.calls_tools else (text, [])
    reply.called(calls)
    blocks = ([{"type": "text", "text": content}] if content or not calls else []) + [_tool_use(c) for c in calls]
    return JSONResponse({"id": "msg_" + reply.id, "type": "message", "role": "assistant", "model": reply.model,
                         "content": blocks, "stop_reason": _stop(reply),
                         "stop_sequence": _stop_sequence(reply),
                         "usage": _usage(reply)})


def _sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _events(request: Request, replies: list[Reply]) -> AsyncIterator[str]:
    """The message as Anthropic streams it: message_start; a text block opened at the first text,
    its deltas, closed; each tool call a tool_use block whose input comes as one input_json_delta;
    message_delta with the stop reason and the output tokens; message_stop."""
    reply = replies[0]
    index = 0
    text_open = False
    try:
        message = {"id": "msg_" + reply.id, "type": "message", "role": "assistant", "model": reply.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": _usage(reply, 0)}
        yield _sse("message_start", {"type": "message_start", "message": message})

        def text_delta(text: str):
            nonlocal text_open
            if not text_open:
                text_open = True
                yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}})
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "text_delta", "text": text}})

        async for piece in shown(reply):
            for event in text_delta(piece):
                yield event
        if reply.gone:
            return
        if text_open:
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        for call in reply.calls:
            block = _tool_use(call)
            yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": {**block, "input": {}}})
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        yield _sse("message_delta", {"type": "message_delta", "delta": {
                       "stop_reason": _stop(reply), "stop_sequence": _stop_sequence(reply)},
                                     "usage": {"output_tokens": reply.tokens}})
        yield _sse("message_stop", {"type": "message_stop"})
    except Exception as e:  # the status line is sent: the error is an event, in Anthropic's shape
        yield _sse("error", error_body(stream_error(request, e)))
    finally:
        await reply.close()
