"""The server's own routes, beside its dialects (dialects/): /health, the arena page and /report,
/metrics, /v1/models, and vLLM's /tokenize, /detokenize and /tokenizer_info (which lm-eval's remote
tokenizer reads). Shared state comes from `request.app.state` (set by app.create_app): `engines`
{model id: Engine}, `owner` (what /v1/models reports as owned_by), `created` (the server's start
time), `limits`, `metrics` and `results`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from billion.server.errors import APIError
from billion.server.metrics import CONTENT_TYPE
from billion.server.prompts import chat_prompt
from billion.server.requests import DetokenizeRequest, TokenizeRequest, parse_request, read_body, served_model

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    """200 while every engine's worker runs, else 503 naming what failed (the server is then shutting
    down). Per model id: requests in flight or queued, and its engine's batch steps run, tokens
    generated and what it holds (rows decoding, requests queued, prompt-cache rows and their tokens)
    as of its last step."""
    engines = request.app.state.engines
    failed = sorted({e.failure for e in engines.values() if e.failure})
    body = {"status": "error" if failed else "ok", "models": list(engines),
            "busy": sorted({k for k, v in engines.items() if v.busy}),
            "requests": {k: v.pending for k, v in engines.items()},  # decoding or queued, per model id
            "engines": {k: v.stats for k, v in engines.items()}}
    if failed:
        body["failed"] = failed
    return JSONResponse(body, status_code=503 if failed else 200)


PAGE = Path(__file__).resolve().parent / "page"  # the arena's static files


@router.get("/", include_in_schema=False)
async def arena():
    """The arena page: type once, every served engine answers in its own column (page/arena.js)."""
    return FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/report", include_in_schema=False)
async def report(request: Request):
    """The records of --results as one page, read afresh at each visit (a benchmark that just wrote
    a record shows up on reload)."""
    folder = request.app.state.results
    if folder is None:
        raise APIError(404, "this server shows no records: start it with --results DIR", code="not_found")
    return HTMLResponse(await run_in_threadpool(_report_page, folder))


def _report_page(folder: str) -> str:
    from billion.records.html import empty_page, page
    from billion.records.store import read_records

    records = read_records([folder])
    return page(records) if records else empty_page(folder)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    """Prometheus' text format (metrics.py)."""
    return Response(request.app.state.metrics.text(), media_type=CONTENT_TYPE)


@router.post("/tokenize")
async def tokenize(request: Request):
    """vLLM's /tokenize: {"model", "prompt", "add_special_tokens"} or {"model", "messages",
    "add_generation_prompt"} (rendered with the chat template, as /v1/chat/completions renders
    them) -> {"tokens", "count", "max_model_len"}."""
    return await _off_the_loop(request, _tokenize)


async def _off_the_loop(request: Request, work):
    """work(body, engines), the body read within the size limit, run in a worker thread."""
    state = request.app.state
    raw = await read_body(request, state.limits.max_body_bytes)
    return await run_in_threadpool(work, raw, state.engines)


def _tokenize(raw: bytes, engines: dict) -> dict:
    req = parse_request(raw, TokenizeRequest, engines)
    engine = engines[req.model]
    with engine.prep_lock:
        if req.messages is not None:
            ids, _ = chat_prompt(req.as_chat(), engine.prep, engine.tool_format)
        else:
            ids = engine.prep.tokenize(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.backend.context_length}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None):
    """vLLM's /tokenizer_info: the tokenizer's special tokens, chat template and context, which
    lm-eval's remote tokenizer reads (with /tokenize and /detokenize) instead of loading one."""
    engines = request.app.state.engines
    backend = engines[served_model(model, engines) if model is not None else next(iter(engines))].backend
    tokenizer = backend.tokenizer
    return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
            "chat_template": getattr(tokenizer, "chat_template", None), "model_max_length": backend.context_length}


@router.post("/detokenize")
async def detokenize(request: Request):
    """vLLM's /detokenize: {"model", "tokens"} -> {"prompt"} (special tokens kept, as given)."""
    return await _off_the_loop(request, _detokenize)


def _detokenize(raw: bytes, engines: dict) -> dict:
    req = parse_request(raw, DetokenizeRequest, engines)
    engine = engines[req.model]
    vocab = engine.backend.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
    with engine.prep_lock:
        return {"prompt": engine.prep.tokenizer.decode(req.tokens)}


@router.get("/v1/models")
async def models(request: Request):
    state = request.app.state
    return {"object": "list", "data": [{"id": k, "object": "model", "created": state.created, "owned_by": state.owner}
                                        for k in state.engines]}
