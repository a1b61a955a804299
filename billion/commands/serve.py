"""`billion serve`: an OpenAI-compatible HTTP server on one engine or several (billion/server/app.py)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import click

from backends.types import UserError
from billion.net import is_loopback
from billion.options import engines, load_options, model_options
from billion.server.limits import Limits
from billion.ui import console


def run_server(app, config) -> None:
    """Run uvicorn until Ctrl-C, SIGTERM or an engine's failure. At the first signal every engine
    refuses queued and new requests (503) while in-flight ones finish within --shutdown-timeout.
    Ctrl-C then ends the command as it ends every billion command (exit 130); SIGTERM, the stop that
    systemd, containers and `kill` ask for, exits 0. An engine whose worker thread died shuts the
    server down the same way and is a one-line error (exit 1)."""
    import signal

    import uvicorn

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:  # the first signal (a second one forces the exit, as uvicorn does)
                app.state.drain()  # flags and a command queue: safe from a signal handler
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # uvicorn would raise it again once stopped: killed, exit 143
                self._captured_signals.remove(sig)

        async def on_tick(self, counter: int) -> bool:
            if app.state.failure() and not self.should_exit:  # checked every 0.1 s by uvicorn's main loop
                app.state.drain()
                self.should_exit = True
            return await super().on_tick(counter)

    Draining(config).run()
    if failure := app.state.failure():
        raise UserError(f"{failure}; the server shut down (the log above has the traceback)")


def server_log(level: str) -> None:
    """billion.server's messages (a client that left, a failed request and its traceback) at
    --log-level, shaped as uvicorn's own lines, beside its access log."""
    import logging

    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    log = logging.getLogger("billion.server")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def read_keys(path: str) -> tuple[str, ...]:
    """API keys from a file: one per line, blank lines and # comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the API keys ({e})") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise UserError(f"{path}: no API key in the file")
    return keys


BUNDLED_TEMPLATES = {"chatml-tools": "chatml_tools.jinja"}  # billion/data/


def read_template(value: str) -> str:
    """--chat-template: a Jinja file, or the name of one billion ships (chatml-tools: ChatML with
    Hermes-style <tool_call> tools, for ChatML models whose own template has no tools, e.g. SmolLM2)."""
    from jinja2 import Environment, TemplateSyntaxError

    path = Path(__file__).resolve().parent.parent / "data" / BUNDLED_TEMPLATES[value] \
        if value in BUNDLED_TEMPLATES else Path(value)
    try:
        text = path.read_text()
        Environment().parse(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{value}: cannot read the chat template ({e})") from None
    except TemplateSyntaxError as e:
        raise UserError(f"{value}:{e.lineno}: not a Jinja template ({e.message})") from None
    return text


def served_name(model: str) -> str:
    """The model name clients use: a local folder by its name, any other spec as written."""
    path = Path(model).expanduser()
    return path.name if path.is_dir() else model


@click.command()
@model_options(skip=("compile",))  # requests decode on prompt-cache sessions: eager
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but a loopback address exposes the model to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level (info logs every request).")
@click.option("--parallel", "-np", type=click.IntRange(1), default=8, show_default=True,
              help="Requests decoded together per engine (llama-server's slots); the llama.cpp peer serves one.")
@click.option("--queue-size", type=click.IntRange(0), default=64, show_default=True,
              help="Requests waiting for a slot, per engine; beyond them a request gets 429 with Retry-After.")
@click.option("--api-key", "api_keys", multiple=True, envvar="BILLION_API_KEY", metavar="KEY",
              help="Require Authorization: Bearer KEY on /v1/* (repeatable) [env BILLION_API_KEY].")
@click.option("--api-key-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A file of API keys, one per line (# comments).")
@click.option("--allowed-origins", default="", metavar="LIST",
              help="Comma list of browser origins allowed besides local ones ('*': any, and any Host).")
@click.option("--max-body-bytes", type=click.IntRange(1), default=Limits.max_body_bytes, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=None,
              help="Longer prompts get 400. Default: the model's context.")
@click.option("--max-tokens", "max_tokens_cap", type=click.IntRange(1), default=Limits.max_tokens, show_default=True,
              help="Tokens a request without max_tokens may generate (the rest of the context, at most this).")
@click.option("--max-messages", type=click.IntRange(1), default=Limits.max_messages, show_default=True,
              help="Messages per chat request.")
@click.option("--max-stop-length", type=click.IntRange(1), default=Limits.max_stop_length, show_default=True,
              help="Characters per stop string (at most 4 of them, as OpenAI).")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="At Ctrl-C: seconds in-flight requests may take to finish (queued ones get 503 at once); "
                   "then they are cancelled.")
@click.option("--draft", default=None, metavar="ngram[:N]",
              help="Prompt lookup inside the batch (torch): each request drafts from its own text, all rows' "
                   "proposals verified in one pass; lossless, and under a request's grammar too.")
@click.option("--num-draft", type=click.IntRange(1), default=4, show_default=True,
              help="Tokens prompt lookup proposes per step.")
@click.option("--chat-template", default=None, metavar="FILE",
              help="Render chats with this Jinja template instead of the model's own; chatml-tools is billion's "
                   "ChatML template with tool calls (for ChatML models without tools, e.g. SmolLM2).")
# the names of tool_formats.FORMATS, written out: importing it here added ~14 ms to every billion
# command's start; tests/test_tool_formats.py holds the two lists equal
@click.option("--tool-format", type=click.Choice(["auto", "hermes", "llama3-json", "mistral", "generic"]),
              default="auto", show_default=True,
              help="How the model calls tools: auto picks it from the chat template (hermes <tool_call> tags, Llama "
                   "3's JSON, Mistral's [TOOL_CALLS], or the generic JSON for templates without tools).")
@click.option("--prefill-chunk", type=click.IntRange(1), default=256, show_default=True,
              help="Prompt tokens prefilled per batch step at most: a long prompt goes in over several steps, the "
                   "other requests decoding between its chunks, and a client that leaves costs at most one chunk.")
@click.option("--results", "results", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Show the records in DIR at /report (as billion report --html renders them).")
@click.option("--request-timeout", type=click.FloatRange(0, min_open=True), default=Limits.request_timeout_s,
              show_default=True, help="Seconds a generation may run; then it ends with finish_reason length.")
def serve(model, backend, host, port, log_level, parallel, queue_size, api_keys, api_key_file, allowed_origins,
          max_body_bytes, max_prompt_tokens, max_tokens_cap, max_messages, max_stop_length, shutdown_timeout,
          draft, num_draft, chat_template, tool_format, prefill_chunk, results, request_timeout, **opts):
    """Serve a model over an OpenAI-compatible HTTP API.

    Routes: /v1/chat/completions and /v1/completions (streamed as server-sent events with
    "stream": true), OpenAI's /v1/responses, Anthropic's /v1/messages, /v1/models, /health,
    /tokenize, /detokenize, /metrics (Prometheus); the arena page at / (every engine answers in
    its own column) and, with --results, the records at /report. Each engine is the model id <model>@<engine>
    (with one engine, the plain model name works too). Concurrent requests are decoded
    together (continuous batching, up to --parallel per engine; a request arriving mid-batch
    joins at the next step, one whose client is gone leaves at the next step). Any OpenAI
    client works, e.g.

        OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    """
    try:
        import uvicorn

        from billion.server.app import create_app
    except ImportError as e:
        raise UserError(f"billion serve needs fastapi and uvicorn ({e.name} is missing): "
                        f"pip install fastapi uvicorn") from None

    from billion.loading import resolve
    from billion.runner import Runner

    from billion.server.access import Access

    keys = tuple(api_keys) + (read_keys(api_key_file) if api_key_file else ())
    access = Access(api_keys=keys, local_only=is_loopback(host),
                    allowed_origins=tuple(o.strip() for o in allowed_origins.split(",") if o.strip()))
    limits = Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens_cap,
                    max_messages=max_messages, max_stop_length=max_stop_length, request_timeout_s=request_timeout)
    template = read_template(chat_template) if chat_template else None
    lookup = None
    if draft is not None:
        from billion.tasks.speculate import ngram_draft

        lookup = ngram_draft(draft)
        if lookup is None:
            raise click.UsageError("serve drafts by prompt lookup only: --draft ngram or ngram:N")
    names = engines(backend)
    runner = Runner("serve", resolve(model), load_options(opts))  # loads and closes; the server writes no records
    if not is_loopback(host):
        console.print(f"warning: listening on {host}, not a loopback address: anyone who can reach this machine "
                      f"can use the model" + ("" if keys else " (no --api-key: there is no authentication)"),
                      style="yellow", markup=False)
    name = served_name(model)
    with ExitStack() as stack:
        served = {}
        for engine in names:
            served[f"{name}@{engine}"] = stack.enter_context(runner.loaded(engine))
            if template is not None:
                served[f"{name}@{engine}"].tokenizer.chat_template = template
        if len(names) == 1:
            served[name] = served[f"{name}@{names[0]}"]
        app = create_app(served, name="billion", parallel=parallel, queue_size=queue_size, limits=limits,
                         access=access, draft=lookup, num_draft=num_draft, prefill_chunk=prefill_chunk,
                         results=results, tool_format=tool_format)
        console.print(f"serving {', '.join(served)} on http://{host}:{port}/v1; the arena page: "
                      f"http://{host}:{port}/" + (f", records: http://{host}:{port}/report" if results else ""),
                      markup=False, soft_wrap=True)
        for model_id, engine in app.state.engines.items():
            console.print(f"tool calls on {model_id}: the {engine.tool_format.NAME} format ({engine.tool_format_why})",
                          markup=False, soft_wrap=True)
        server_log(log_level)
        # the engines' workers stop in the app's lifespan, before the ExitStack closes them
        run_server(app, uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                       timeout_graceful_shutdown=shutdown_timeout))
