"""A checked request turned into what the engine runs: prompt token ids (the messages rendered with
the model's chat template and its tool format, or the completion prompt), the grammar the reply
must follow, and the GenerationConfig, or the 4xx that says why not. Every dialect's request comes
through `prepare`; nothing here runs a generation.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from backends import constraints
from backends.base import Backend
from backends.types import GenerationConfig, UserError
from billion.server.errors import APIError
from billion.server.limits import Limits
from billion.server.requests import ChatRequest, CompletionRequest, RequestBase, read_body
from billion.server.tool_formats import hermes
from billion.tasks.chat import FALLBACK_STOPS, render


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
                                       parallel=req.parallel_tool_calls is not False, tokenizer=backend.tokenizer)
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


def echo_text(req: CompletionRequest, engine, prompt_ids: list[int]) -> str:
    """The prompt as `echo` repeats it: its text as sent, or its token ids decoded."""
    prompt = single_prompt(req)
    if isinstance(prompt, str):
        return prompt
    with engine.prep_lock:
        return engine.prep.tokenizer.decode(prompt_ids)


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


async def prepared(request, parse):
    """(request, engine, prompt ids, generation settings): the body read within the size limit, then
    parsed (`parse(raw, engines, limits)`: a dialect's body as the request the server runs), rendered
    and tokenized in a worker thread (a megabyte of JSON or a long prompt must not stop the event
    loop), on the engine's own tokenizer copy, never on the tokenizer its batch is detokenizing
    with at the same moment."""
    state = request.app.state
    raw = await read_body(request, state.limits.max_body_bytes)
    return await run_in_threadpool(lambda: prepare(parse(raw, state.engines, state.limits), state.engines,
                                                   state.limits))


def prepare(req: RequestBase, engines: dict, limits):
    """A parsed request's engine, prompt ids and generation settings (in a worker thread)."""
    engine = engines[req.model]
    with engine.prep_lock:  # one request at a time on the copy (a Rust tokenizer is not re-entrant)
        prep = engine.prep
        if isinstance(req, ChatRequest):
            prompt_ids, stops = chat_prompt(req, prep, engine.tool_format)
        else:
            prompt_ids, stops = completion_prompt(req, prep), ()
        grammar = output_grammar(req, prep, engine.tool_format)
    return req, engine, prompt_ids, generation_config(req, prep, prompt_ids, stops, limits, grammar)
