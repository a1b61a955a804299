"""OpenAI's Chat Completions (`/v1/chat/completions`) and Completions (`/v1/completions`): the two
dialects whose requests are the ones the server runs (requests.py), so their translation is only
the answer: `choices` (n of them, decoded together, streamed interleaved under their index), each
a message (with its tool calls, in OpenAI's shape) or a text, their logprobs, usage, and
chat.completion.chunk / text_completion events ending in `data: [DONE]`. Completions' `echo`
repeats the prompt, with its own log-probabilities when `logprobs` is set (what lm-eval's
local-completions model scores with).
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from billion.server.answers import Reply, collected, respond, shown
from billion.server.errors import gone, stream_error
from billion.server.prompts import echo_text, prepared
from billion.server.requests import ChatRequest, CompletionRequest, parse_request

router = APIRouter()


FINISH = {"eos": "stop", "stop": "stop", "max_tokens": "length", "max_time": "length", "tool_calls": "tool_calls"}


def _parsed_as(model_cls):
    """The parse `prepared` runs: the body as `model_cls`, checked (requests.parse_request)."""
    return lambda raw, engines, limits: parse_request(raw, model_cls, engines, limits)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    req, engine, prompt_ids, gen = await prepared(request, _parsed_as(ChatRequest))
    return await respond(request, req, engine, prompt_ids, gen, answer, events)


@router.post("/v1/completions")
async def completions(request: Request):
    req, engine, prompt_ids, gen = await prepared(request, _parsed_as(CompletionRequest))
    echo = await run_in_threadpool(echo_text, req, engine, prompt_ids) if req.echo else None
    return await respond(request, req, engine, prompt_ids, gen, answer, events, kind="text", echo=echo)


# ---------------------------------------------------------------- the answer


async def answer(replies: list[Reply]) -> JSONResponse:
    """{id, object, created, model, choices, usage}: every choice whole."""
    choices = await asyncio.gather(*(_choice(r) for r in replies))
    if None in choices:
        return gone()
    obj = "chat.completion" if replies[0].kind == "chat" else "text_completion"
    return JSONResponse({**_head(replies[0], obj), "choices": list(choices), "usage": _usage(replies)})


def events(request: Request, replies: list[Reply]) -> AsyncIterator[str]:
    streams = [_choice_events(r) for r in replies]
    return _stream_of(request, replies, streams[0] if len(streams) == 1 else _interleaved(streams))


def _head(reply: Reply, obj: str) -> dict:
    prefix = "chatcmpl-" if reply.kind == "chat" else "cmpl-"
    return {"id": prefix + reply.id, "created": reply.created, "model": reply.model, "object": obj}


def _logprobs(reply: Reply) -> dict | None:
    """The logprobs object of the tokens counted since the last call, in OpenAI's shape for
    this kind (chat: content entries; completions: the legacy parallel lists)."""
    if not reply.logprobs:
        return None
    entries = reply.take_entries()
    if reply.kind == "chat":
        return {"content": [{**_token(text, lp), "top_logprobs": [_token(t, v) for t, v in top]}
                            for (text, lp, top), _ in entries]}
    return {"tokens": [text for (text, _, _), _ in entries],
            "token_logprobs": [lp for (_, lp, _), _ in entries],
            # an echoed prompt's first token: nothing predicts it (null, as vLLM answers)
            "top_logprobs": [None if lp is None else {t: v for t, v in top} for (_, lp, top), _ in entries],
            "text_offset": [offset for _, offset in entries]}


async def _choice(reply: Reply) -> dict | None:
    """One choice of a JSON answer, whole (None: its client is gone)."""
    content = await collected(reply)
    if content is None:
        return None
    if reply.kind == "chat":
        message = {"role": "assistant", "content": content}
        if reply.calls_tools:
            message["content"], calls = reply.tool_format.parse(content)
            if calls:
                message["tool_calls"] = calls
            reply.called(calls)
        choice = {"index": reply.index, "message": message, "logprobs": _logprobs(reply)}
    else:
        choice = {"index": reply.index, "text": reply.echo + content, "logprobs": _logprobs(reply)}
    choice["finish_reason"] = FINISH[reply.reason]
    return choice


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _event(reply: Reply, delta: str | None, reason: str | None, first: bool = False,
           tool_calls: list | None = None) -> str:
    """One SSE chunk: a chat delta (the first one carries the role; tool-call deltas as OpenAI
    streams them) or a piece of text, with the logprobs of the tokens since the last chunk."""
    if reply.kind == "chat":
        d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
        if tool_calls:
            d["tool_calls"] = tool_calls
        choice = {"index": reply.index, "delta": d, "logprobs": None if first else _logprobs(reply),
                  "finish_reason": reason}
    else:
        choice = {"index": reply.index, "text": delta or "", "logprobs": _logprobs(reply), "finish_reason": reason}
    out = {**_head(reply, _chunk_object(reply)), "choices": [choice]}
    if reply.include_usage:
        out["usage"] = None
    return f"data: {json.dumps(out)}\n\n"


def _tool_call_events(reply: Reply, calls: list[dict]):
    """Each call as OpenAI streams one: its id, type and name with empty arguments, then its arguments."""
    for i, call in enumerate(calls):
        head = {"index": i, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}
        yield _event(reply, None, None, tool_calls=[head])
        yield _event(reply, None, None, tool_calls=[{"index": i, "function": {"arguments": call["function"]["arguments"]}}])


def _chunk_object(reply: Reply) -> str:
    return "chat.completion.chunk" if reply.kind == "chat" else "text_completion"


async def _stream_of(request: Request, replies: list[Reply], choices: AsyncIterator[str]) -> AsyncIterator[str]:
    """The choices' events, then the usage chunk (when asked for) and [DONE]; an error as an event."""
    try:
        async for event in choices:
            yield event
        if any(r.gone for r in replies):
            return
        if replies[0].include_usage:
            last = {**_head(replies[0], _chunk_object(replies[0])), "choices": [], "usage": _usage(replies)}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # the status line is sent: report the error in the stream
        yield f"data: {json.dumps(stream_error(request, e).body())}\n\n"


async def _choice_events(reply: Reply) -> AsyncIterator[str]:
    """One choice's events: its role (chat) or echoed prompt, its deltas, its tool calls, its finish."""
    try:
        if reply.kind == "chat":
            yield _event(reply, None, None, first=True)
        elif reply.echo:
            yield _event(reply, reply.echo, None)  # the prompt (and its logprobs), then the completion
        async for piece in shown(reply):
            yield _event(reply, piece, None)
        if not reply.gone:
            for event in _tool_call_events(reply, reply.calls):
                yield event
            yield _event(reply, None, FINISH[reply.reason])
    finally:
        await reply.close()  # a client gone: the request leaves the batch


def _usage(replies: list[Reply]) -> dict:
    """The usage of an answer: its prompt once, every choice's tokens."""
    n, completion = len(replies[0].prompt_ids), sum(r.tokens for r in replies)
    return {"prompt_tokens": n, "completion_tokens": completion, "total_tokens": n + completion,
            "prompt_tokens_details": {"cached_tokens": replies[0].cached}}


async def _interleaved(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The items of several async iterators as each comes (an error in one ends them all)."""
    queue: asyncio.Queue = asyncio.Queue()
    ended = object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(e)
        finally:
            await queue.put(ended)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is ended:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
