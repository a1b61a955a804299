"""What a request may say, and the 4xx it gets when it says something else.

The one request the server runs is Chat Completions' (ChatRequest) or Completions' (CompletionRequest):
every other dialect translates its own body into a Chat Completions body and passes the same checks
(chat_request). Unknown fields are ignored, as clients send many; fields billion does not honour
are refused by name (refuse_unsupported), never answered as if absent. Nothing here renders a
prompt (prompts.py) or touches an engine.
"""

from __future__ import annotations

import json
from typing import Literal, Union

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from billion.server.errors import APIError, validation_error
from billion.server.limits import Limits

# ---------------------------------------------------------------- the models


class RequestBase(BaseModel):
    """Fields both routes share. Unknown fields are ignored (clients send many)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # below sampling.MIN_TEMPERATURE: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # numpy's generators take 0 .. 2**64-1
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)  # choices, each decoded as its own request in the batch
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # extensions (vLLM's names)
    top_k: int = Field(0, ge=-1)  # 0 or -1 (vLLM's): off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    # a tiny or huge penalty scales logits past float range; vLLM accepts (0, 2], llama.cpp more
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    ignore_eos: bool = False
    # vLLM's: the prompt cache reuses (and reports) only prefixes cached under the same salt
    cache_salt: str | None = Field(None, min_length=1, max_length=256)
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}
    response_format: dict | None = None

    @property
    def include_usage(self) -> bool:
        """A stream ends with a usage chunk (stream_options.include_usage)."""
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one of them

    @model_validator(mode="after")
    def _has_content(self):
        # as OpenAI answers: only an assistant's message that calls tools may leave content out
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"expected content, got null (only an assistant message with tool_calls may "
                             f"leave it out; this is a {self.role} message)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates read it (tool calls in tools.for_template's shape)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")  # OpenAI's rule
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: Function


class ChatRequest(RequestBase):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None  # clients send null for off
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def calls_tools(self) -> bool:
        """Whether tools go into the prompt and the reply is parsed for calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(RequestBase):
    # one prompt: text, token ids, or either in a list of one (lm-eval sends [[ids]])
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False  # the answer repeats the prompt; with logprobs, the prompt's own log-probabilities
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's: how many alternatives per token

    @property
    def logprobs_wanted(self) -> int | None:
        return self.logprobs


class TokenizeRequest(BaseModel):
    """/tokenize (vLLM's shape): a `prompt`, or `messages` (and `tools`) rendered exactly as
    /v1/chat/completions renders them, generation prompt included. Without `model`, the first
    served one (lm-eval's remote tokenizer sends none; billion serve's engines share one tokenizer)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[Message] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self

    def as_chat(self) -> ChatRequest:
        return ChatRequest(model=self.model, messages=self.messages, tools=self.tools)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None  # as /tokenize's
    tokens: list[int]


# ---------------------------------------------------------------- checks


# Fields of OpenAI's API that billion does not implement: a request that sets them (to anything but
# their "off" value) is refused with a 400 naming the field, never answered as if they were absent.
UNSUPPORTED = {
    "functions": lambda v: not v,  # the deprecated form of tools
    "function_call": lambda v: v in (None, "none"),
    "logit_bias": lambda v: not v,
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
}

# Chat fields that /v1/completions has no use for: refused there, not ignored.
CHAT_ONLY = {
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v is None,
    "top_logprobs": lambda v: v in (None, 0),  # the legacy API's logprobs is the count
}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (not after reading it all)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(raw: bytes) -> dict:
    """A request body as a JSON object, or the 400 that says why not."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        # ValueError covers JSONDecodeError, NaN/Infinity and integers longer than Python parses;
        # RecursionError, nesting deeper than the parser goes
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def refuse_unsupported(body: dict, unsupported: dict, why: str = "by this server (billion); the request was not run"
                       ) -> None:
    """A 400 naming the first field of `unsupported` ({field: its "off" test}) the body sets to
    anything but off; `why` is said after "is not supported"."""
    for field, off in unsupported.items():
        if field in body and not off(body[field]):
            raise APIError(400, f"{field} is not supported {why}", param=field, code="unsupported_parameter")


def validated(body: dict, model_cls):
    """The body as `model_cls`, or a 400 naming the first field that is wrong."""
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def served_model(name: str, models) -> str:
    """`name` when it is one of `models` (the served model ids), else the 404 that lists them."""
    if name not in models:
        raise APIError(404, f"the model {name!r} does not exist; available: {', '.join(models)}", param="model",
                       code="model_not_found")
    return name


def parse_request(raw: bytes, model_cls: type[RequestBase], models, limits: Limits = Limits()) -> RequestBase:
    """The request body as `model_cls`, for one of `models` (the served model ids), or a 4xx.
    The checks run in this order, so a request with several faults gets the first one's error."""
    body = json_object(raw)
    chat_only = CHAT_ONLY if model_cls is CompletionRequest else {}
    refuse_unsupported(body, UNSUPPORTED)
    refuse_unsupported(body, chat_only, "on /v1/completions (use /v1/chat/completions); the request was not run")
    req = validated(body, model_cls)
    if req.model is None and model_cls in (TokenizeRequest, DetokenizeRequest):
        req.model = next(iter(models))
    served_model(req.model, models)
    if isinstance(req, ChatRequest):
        if len(req.messages) > limits.max_messages:
            raise APIError(400, f"at most {limits.max_messages} messages per request", param="messages",
                           code="invalid_value")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if req.calls_tools and req.response_format not in (None, {"type": "text"}):
            raise APIError(400, "tools and response_format cannot be combined", param="response_format",
                           code="unsupported_value")
    return req


def chat_request(body: dict, models, limits: Limits = Limits()) -> "ChatRequest":
    """Another dialect's request translated to a Chat Completions body (fields None are left out),
    through every check of the chat route: the model, the messages, the tools, the limits."""
    return parse_request(json.dumps({k: v for k, v in body.items() if v is not None}).encode(), ChatRequest,
                         models, limits)
