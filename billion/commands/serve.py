"""`billion serve`: an OpenAI-compatible HTTP server on one engine or several (billion/server/app.py)."""

from __future__ import annotations

import ipaddress
from contextlib import ExitStack
from pathlib import Path

import click

from backends.types import UserError
from billion.options import engines, load_options, model_options
from billion.ui import console


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
def serve(model, backend, host, port, log_level, parallel, queue_size, **opts):
    """Serve a model over an OpenAI-compatible HTTP API.

    Routes: /v1/chat/completions and /v1/completions (streamed as server-sent events with
    "stream": true), /v1/models, /health. Each engine is the model id <model>@<engine>
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

    names = engines(backend)
    runner = Runner("serve", resolve(model), load_options(opts))  # loads and closes; the server writes no records
    if not is_loopback(host):
        console.print(f"warning: listening on {host}, not a loopback address: anyone who can reach this machine "
                      f"can use the model (there is no authentication)", style="yellow", markup=False)
    name = served_name(model)
    with ExitStack() as stack:
        served = {}
        for engine in names:
            served[f"{name}@{engine}"] = stack.enter_context(runner.loaded(engine))
        if len(names) == 1:
            served[name] = served[f"{name}@{names[0]}"]
        app = create_app(served, name="billion", parallel=parallel, queue_size=queue_size)
        console.print(f"serving {', '.join(served)} on http://{host}:{port}/v1", markup=False, soft_wrap=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
