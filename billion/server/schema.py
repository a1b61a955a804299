"""What a request may say, and the 4xx it gets when it says something else.

The request models (pydantic; unknown fields are ignored, as clients send many), the OpenAI-style
error shape {"error": {"message", "type", "param", "code"}}, and the checks that turn a request
into (prompt token ids, GenerationConfig) or raise an APIError. Nothing here touches an engine's
state or runs a generation, so more validation (request limits, structured output) slots in here.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends import constraints
from backends.base import Backend
from backends.types import GenerationConfig, UserError
from billion.server.tool_formats import hermes
from billion.server.limits import Limits
from billion.tasks.chat import FALLBACK_STOPS, render

# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        """The same error in Anthropic's shape, for /v1/messages: {"type": "error", "error": {"type", "message"}}."""
        kind = ANTHROPIC_ERRORS.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str = "") -> JSONResponse:
        """The answer to a request for `path`: in its API's error shape."""
        body = self.anthropic_body() if path.startswith(ANTHROPIC_PATHS) else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


ANTHROPIC_PATHS = ("/v1/messages",)  # messages.py's routes answer errors in Anthropic's shape
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error"}


def internal_error(e: BaseException, request_id: str | None = None) -> APIError:
    """An engine failure (or any bug): a 500 in the same shape, with the request's id; the
    exception's class and message stay in the server's log (with the traceback), not in the answer.
    Out of memory (Python's MemoryError, torch's OutOfMemoryError) is a 503 saying so: the request
    may fit later, or shorter."""
    logging.getLogger("billion.server").error("request %s failed", request_id or "?",
                                              exc_info=(type(e), e, e.__traceback__))
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return APIError(503, f"out of memory for this request (request {request_id or '?'}): retry later, or with "
                             f"a shorter prompt or max_tokens", type="server_error", code="out_of_memory")
    return APIError(500, f"internal error (request {request_id or '?'}); the server log has the details",
                    type="server_error")


def _validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")  # pydantic's word for our own checks
    return APIError(400, f"{param + ': ' if param else ''}{msg}", param=param,
                    code="invalid_value" if first.get("type") != "missing" else "missing_required_parameter")


# ---------------------------------------------------------------- request models


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


def chat_request(body: dict, models, limits: Limits = Limits()) -> "ChatRequest":
    """Another dialect's request translated to a Chat Completions body (fields None are left out),
    through every check of the chat route: the model, the messages, the tools, the limits."""
    return parse_request(json.dumps({k: v for k, v in body.items() if v is not None}).encode(), ChatRequest,
                         models, limits)


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
        raise _validation_error(e) from None


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


def chat_prompt(req: ChatRequest, backend: Backend, tool_format=hermes) -> tuple[list[int], tuple[str, ...]]:
    """(prompt token ids, extra stop strings): the messages rendered with the model's chat template
    (with the tools, when the request may call them, as its tool format has them rendered), or for
    a base model the plain transcript, which must also stop at the next "User:" turn."""
    messages = [m.for_template() for m in req.messages]
    tool_list = None
    if req.calls_tools:
        problem = tool_format.template_problem(getattr(backend.tokenizer, "chat_template", None))
        if problem:
            raise APIError(400, problem, param="tools", code="unsupported_value")
        tool_list = [t.model_dump(exclude_none=True) for t in req.tools]
    elif (any(m.role == "tool" or m.tool_calls for m in req.messages) and not backend.has_chat_template
          and tool_format.NAME != "generic"):
        raise APIError(400, "tool messages need a chat template that renders them", param="messages")
    try:
        messages, tool_list = tool_format.for_template(messages, tool_list)
        prompt_ids = render(backend, messages, tools=tool_list)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None
    return prompt_ids, (() if backend.has_chat_template else FALLBACK_STOPS)


def output_grammar(req: RequestBase, backend: Backend, tool_format=hermes) -> str | None:
    """The grammar the reply must follow (backends/constraints.py): the tool calls tool_choice asks
    for, or response_format's JSON object or schema; None for free text. It is also built on this
    model's vocabulary, so that what cannot be enforced is a 400 naming the part now, never an
    unconstrained reply and never a failure once queued."""
    calls_tools = isinstance(req, ChatRequest) and req.calls_tools
    param = "tools" if calls_tools else "response_format"
    try:
        grammar = (tool_format.grammar([t.model_dump() for t in req.tools], req.tool_choice or "auto",
                                       parallel=req.parallel_tool_calls is not False)
                   if calls_tools else _format_grammar(req.response_format))
        if grammar is not None:
            backend.grammars.matcher(grammar)
    except UserError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="unsupported_schema") from None
    return grammar


def _format_grammar(fmt: dict | None) -> str | None:
    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return constraints.json_object()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise APIError(400, "response_format.json_schema.schema is missing", param="response_format",
                           code="missing_required_parameter")
        what = f"the JSON schema {spec['name']!r}" if spec.get("name") else "the JSON schema"
        return constraints.json_schema(spec["schema"], what)
    raise APIError(400, f"response_format.type must be text, json_object or json_schema, not {kind!r}",
                   param="response_format", code="invalid_value")


def single_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt, as text or token ids, out of the list of one that clients may send it in."""
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt",
                           code="unsupported_value")
        prompt = prompt[0]
    return prompt


def completion_prompt(req: CompletionRequest, backend: Backend) -> list[int]:
    """The prompt's token ids: one string (alone or in a list of one) tokenized, or token ids as given."""
    prompt = single_prompt(req)
    if isinstance(prompt, str):
        prompt_ids = backend.tokenize(prompt)
    else:
        prompt_ids = list(prompt)
        if any(not 0 <= t < backend.vocab_size for t in prompt_ids):
            raise APIError(400, f"token ids must be in [0, {backend.vocab_size})", param="prompt",
                           code="invalid_value")
    return prompt_ids


def generation_config(req: RequestBase, backend: Backend, prompt_ids: list[int], extra_stops: tuple = (),
                      limits: Limits = Limits(), grammar: str | None = None) -> GenerationConfig:
    """The sampling settings for `req`, once the prompt is known to leave room in the context."""
    room = backend.context_length - len(prompt_ids)
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if limits.max_prompt_tokens and len(prompt_ids) > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                            f"{limits.max_prompt_tokens}", param="messages" if isinstance(req, ChatRequest)
                       else "prompt", code="context_length_exceeded")
    wanted = req.max_completion_tokens or req.max_tokens
    if room < 1 or (wanted and wanted > room):
        raise APIError(400, f"this model's maximum context length is {backend.context_length} tokens; the "
                            f"prompt has {len(prompt_ids)} tokens"
                            + (f" and {wanted} were asked for the completion" if wanted else ""),
                       param="messages" if isinstance(req, ChatRequest) else "prompt",
                       code="context_length_exceeded")
    if grammar is not None and req.ignore_eos:
        raise APIError(400, "ignore_eos cannot be combined with response_format or tools", param="ignore_eos",
                       code="unsupported_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.max_stops:
        raise APIError(400, f"at most {limits.max_stops} stop sequences", param="stop", code="invalid_value")
    if any(len(s) > limits.max_stop_length for s in stops):
        raise APIError(400, f"a stop sequence is at most {limits.max_stop_length} characters", param="stop",
                       code="invalid_value")
    return GenerationConfig(
        max_tokens=wanted or min(room, limits.max_tokens), temperature=req.temperature, top_p=req.top_p, seed=req.seed,
        ignore_eos=req.ignore_eos, top_k=max(req.top_k, 0), min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, stop=tuple(stops) + extra_stops, grammar=grammar,
        logprobs=req.logprobs_wanted)
