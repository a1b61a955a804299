"""`billion chat`: a streaming terminal chat on either engine, and replies compared side by side."""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from backends.types import UserError
from billion.options import engines, load_options, model_options, results_option
from billion.tasks.chat import FALLBACK_TEMPLATE
from billion.ui import console, fmt

HELP = """\
/clear          forget the conversation (the system message stays)
/system [text]  set the system message (no text: remove it)
/stats          this session's statistics
/help           this list
/quit           leave (or Ctrl-D; Ctrl-C at the prompt too)
Ctrl-C during a reply stops that reply and keeps what was said in the conversation."""


@click.command()
@model_options(skip=("compile",))  # a conversation decodes on its prompt-cache session: eager
@click.option("--prompt", "-p", default=None, help="Answer this one message and exit.")
@click.option("--system", "-s", default=None, help="System message.")
@click.option("--max-tokens", "-n", type=click.IntRange(1), default=256, show_default=True,
              help="Most tokens per reply (it also stops at the model's end-of-turn token).")
@click.option("--temperature", "-t", type=click.FloatRange(0), default=0.0, show_default=True,
              help="0 is greedy: the same reply on both engines (in float32).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (each reply starts from it).")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="Sample among the k most likely "
              "tokens (0: off).")
@click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Drop tokens less likely than min-p times the most likely one (0: off).")
@click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Divide positive logits (multiply negative ones) of tokens already in the prompt or reply "
                   "(1: off; 1.1-1.3 is usual).")
@click.option("--stop", "stops", multiple=True, metavar="TEXT",
              help="End the reply before this text (repeat for several).")
@click.option("--no-prompt-cache", is_flag=True,
              help="Recompute the whole conversation every turn instead of reusing its KV cache.")
@click.option("--compare", "-c", "compare_models", multiple=True, metavar="MODEL",
              help="Also send the conversation to MODEL (repeat it, or a comma list); with --backend all, "
                   "every model on every engine. Replies are shown side by side with their speed.")
@click.option("--draft", default=None, metavar="MODEL",
              help="Speculative decoding with this draft model (same tokenizer), on each engine; layers:N (the "
                   "model's own first N layers); or ngram[:N]: "
                   "prompt lookup, no model (it proposes what followed an earlier occurrence of the last tokens).")
@click.option("--num-draft", type=click.IntRange(1), default=4, show_default=True,
              help="Tokens the draft proposes per step.")
@click.option("--json-schema", "json_schema", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Constrain every reply to JSON valid under this JSON schema (constrained decoding, the same "
                   "on every engine).")
@click.option("--regex", default=None, metavar="PATTERN",
              help="Constrain every reply to text matching this regular expression (Rust syntax).")
@click.option("--json", "as_json", is_flag=True,
              help="With --prompt: print the records as JSON Lines on stdout (one per model and engine).")
@results_option
def chat(model, backend, prompt, system, max_tokens, temperature, top_p, seed, top_k, min_p, repetition_penalty,
         stops, no_prompt_cache, compare_models, draft, num_draft, json_schema, regex, as_json, results_dir, **opts):
    """Chat with a model in the terminal, or answer one --prompt.

    Streams the reply, keeps the conversation, and shows tokens, time to first token
    and tok/s after each reply. Models without a chat template (base models such as
    Pythia) get a plain "User: …\\nAssistant:" transcript, said on screen. When the
    conversation outgrows the model's context, the oldest exchanges are dropped (the
    system message stays). Type /help in the chat for its commands.

    Every run writes a JSON record: --prompt the reply and its timing, an interactive
    session its statistics (not the conversation).
    """
    from backends.types import GenerationConfig
    from billion.loading import resolve
    from billion.runner import Runner
    from billion.tasks.speculate import prepare_pair

    if as_json and prompt is None:
        raise UserError("--json needs --prompt")
    if draft and compare_models:
        raise UserError("--draft drafts for --model; it cannot be combined with --compare")
    grammar = reply_grammar(json_schema, regex)
    if grammar and draft:
        raise UserError("--json-schema and --regex cannot be combined with --draft in chat (billion serve "
                        "--draft ngram constrains drafts)")
    specs = dict.fromkeys([model] + [m.strip() for spec in compare_models for m in spec.split(",") if m.strip()])
    pair = prepare_pair(model, draft) if draft else None  # as bench: vocabularies checked before any model loads
    models = [pair.target] if pair else [resolve(spec) for spec in specs]  # each resolved once
    gen = GenerationConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, top_k=top_k,
                           min_p=min_p, repetition_penalty=repetition_penalty, stop=tuple(stops), grammar=grammar)
    config = {"system": system, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
              "seed": seed, "top_k": top_k, "min_p": min_p, "repetition_penalty": repetition_penalty,
              "stop": list(stops), "prompt_cache": not no_prompt_cache,
              "draft": pair.draft_label if pair else None, "num_draft": num_draft if pair else None,
              "json_schema": json_schema, "regex": regex}
    runners = [Runner("chat", m, load_options(opts), config, results_dir) for m in models]
    setup = Setup([(name, r) for r in runners for name in engines(backend)], gen, system, pair, num_draft,
                  not no_prompt_cache)
    with ExitStack() as stack:
        for r in runners:  # each exits 130 at the end if one of its replies was interrupted
            stack.enter_context(r)
        if prompt is not None:
            answer_once(setup, prompt, as_json)
        else:
            interactive(setup)


def reply_grammar(schema_file: str | None, regex: str | None) -> str | None:
    """The grammar of --json-schema FILE or --regex (backends/constraints.py), refused with the part
    llguidance cannot enforce; None without either."""
    from backends import constraints

    if schema_file and regex:
        raise UserError("--json-schema and --regex exclude each other")
    if regex is not None:
        return constraints.regex(regex)
    if schema_file is None:
        return None
    try:
        schema = json.loads(Path(schema_file).read_text())
    except OSError as e:
        raise UserError(f"{schema_file}: cannot read the schema ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{schema_file}: not a text file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{schema_file}:{e.lineno}: not JSON ({e.msg})") from None
    return constraints.json_schema(schema, f"the JSON schema in {schema_file}")


@dataclass
class Setup:
    """What every model in the conversation shares."""

    targets: list[tuple[str, object]]  # (engine, the Runner of a model)
    gen: object  # GenerationConfig
    system: str | None
    pair: object  # the model and its draft (speculate.Pair), or None
    num_draft: int
    prompt_cache: bool = True

    def new_chat(self, runner, engine: str, backend, stack: ExitStack, drafts: dict):
        from billion.tasks.chat import Chat

        draft = None
        if self.pair:
            if engine not in drafts:
                drafts[engine] = stack.enter_context(runner.draft(engine, self.pair))
            draft = drafts[engine]
        return Chat(backend, self.gen, self.system, draft, self.num_draft, prompt_cache=self.prompt_cache)

    def record(self, runner, engine: str, chat, started: float, mode: str, metrics: dict, interrupted: bool,
               extra: dict) -> dict:
        from billion.runner import EngineRun

        run = EngineRun(engine, chat.backend, chat.backend.info(), started, interrupted)
        return runner.record(run, metrics, config={"mode": mode, "template": chat.template}, extra=extra)


def label(engine: str, model) -> str:
    """How a model and engine are named on screen: a local folder by its name."""
    spec = str(model)
    path = Path(spec).expanduser()
    return f"{path.name if path.is_dir() else spec} ({engine})"


def stats_line(stats) -> str:
    parts = [f"{stats.tokens} tokens", f"TTFT {fmt(stats.ttft_s, 3)} s", f"{fmt(stats.decode_tps)} tok/s"]
    if stats.tokens_from_draft:
        parts.append(f"{stats.tokens_from_draft} from the draft")
    if getattr(stats, "cached_tokens", 0):
        parts.append(f"{stats.cached_tokens} prompt tokens from the cache")
    if stats.stop not in ("eos", "stop_string"):
        parts.append({"max_tokens": "stopped at --max-tokens", "interrupted": "interrupted"}[stats.stop])
    return " · ".join(parts)


def stream_to(out, pieces) -> None:
    """Write a reply's text to `out` piece by piece, as the engine produces it."""
    for piece in pieces:
        out.write(piece)
        out.flush()


def run_reply(chat, text: str, out: Console, *, show_text: bool, name: str):
    """One reply: streamed to stdout (show_text) or counted on a status line. Ctrl-C stops it."""
    reply = chat.ask(text)
    if reply.stats.dropped_turns:
        out.print(f"{name}: the conversation outgrew the context of {chat.backend.context_length} tokens: "
                  f"dropped the {reply.stats.dropped_turns} oldest exchange(s) (the system message stays)",
                  style="yellow", markup=False, soft_wrap=True)
    pieces = reply.pieces()
    try:
        if show_text:
            stream_to(sys.stdout, pieces)
        else:
            with out.status(f"{name}: thinking...") as status:
                for _ in pieces:
                    status.update(f"{name}: {reply.stats.tokens} tokens")
    except KeyboardInterrupt:
        pieces.close()  # ends the reply now: it joins the history as it stands
    if show_text:
        sys.stdout.write("\n")
    return reply


def compare_table(replies: dict) -> Table:
    """Replies side by side, one column per model and engine, with their speed."""
    table = Table(show_lines=True)
    table.add_column("")
    for name in replies:
        table.add_column(name, overflow="fold", max_width=60)
    rows = (("reply", lambda r: Text(r.text) if r.text else Text("(no printable text)", style="dim")),
            ("tokens", lambda r: str(r.stats.tokens)), ("TTFT s", lambda r: fmt(r.stats.ttft_s, 3)),
            ("tok/s", lambda r: fmt(r.stats.decode_tps)), ("stop", lambda r: r.stats.stop))
    for row, value in rows:
        table.add_row(row, *(value(r) for r in replies.values()))
    return table


def same_replies_note(replies: dict) -> str:
    """Replies compared by token ids (text can hide differences: random weights often decode to nothing)."""
    kinds = {tuple(r.token_ids) for r in replies.values()}
    if len(kinds) == 1:
        return f"identical replies ({len(next(iter(kinds)))} tokens)"
    return f"{len(kinds)} different replies (by token ids)"


def answer_once(setup: Setup, prompt: str, as_json: bool) -> None:
    """--prompt: each model and engine in turn (one loaded at a time), then the side-by-side view."""
    out = Console(stderr=True, highlight=False) if as_json else console
    single = len(setup.targets) == 1
    replies, records = {}, []
    for engine, runner in setup.targets:
        runner.out = out  # with --json, stdout carries the records only
        started = time.time()
        with ExitStack() as stack:
            backend = stack.enter_context(runner.loaded(engine))
            chat = setup.new_chat(runner, engine, backend, stack, {})
            name = label(engine, runner.model)
            if not backend.has_chat_template:
                out.print(f"{name}: {FALLBACK_TEMPLATE}", style="yellow", markup=False, soft_wrap=True)
            reply = run_reply(chat, prompt, out, show_text=single and not as_json, name=name)
            runner.interrupted = reply.stats.stop == "interrupted"  # Ctrl-C ended the reply: exit 130 after
            out.print(stats_line(reply.stats) if single else f"{name}: {stats_line(reply.stats)}", style="dim",
                      markup=False, soft_wrap=True)
            records.append(setup.record(runner, engine, chat, started, "prompt", reply.stats.as_metrics(),
                                        runner.interrupted, {"messages": chat.messages(), "reply": reply.text,
                                                             "reply_token_ids": reply.token_ids}))
            replies[name] = reply
        if runner.interrupted:
            break
    if not single:
        out.print(compare_table(replies))
        out.print(same_replies_note(replies))
    if as_json:
        for rec in records:
            click.echo(json.dumps(rec, default=str))


def interactive(setup: Setup) -> None:
    """The chat loop: every model and engine loaded at once, each with its own history."""
    chats, runners, started = {}, {}, time.time()
    with ExitStack() as stack:
        drafts: dict = {}
        for engine, runner in setup.targets:
            backend = stack.enter_context(runner.loaded(engine))
            key = (engine, str(runner.model))
            chats[key], runners[key] = setup.new_chat(runner, engine, backend, stack, drafts), runner
        names = {key: label(*key) for key in chats}
        for key, c in chats.items():
            template = "chat template" if c.backend.has_chat_template else FALLBACK_TEMPLATE
            console.print(f"{names[key]}: {template}; context {c.backend.context_length} tokens"
                          + (f"; draft {setup.pair.draft_label}" if c.draft else ""), markup=False, soft_wrap=True)
        console.print("[dim]/help for commands, /quit or Ctrl-D to leave[/]")
        try:
            loop(chats, names)
        finally:
            for (engine, spec), c in chats.items():
                if c.replies:
                    setup.record(runners[(engine, spec)], engine, c, started, "interactive", c.summary(), False,
                                 {"replies": [r.as_metrics() for r in c.replies]})


def read_line() -> str | None:
    """The user's next line; None at Ctrl-D or Ctrl-C."""
    try:
        return input("you> ")
    except (EOFError, KeyboardInterrupt):
        sys.stdout.write("\n")
        return None


def loop(chats: dict, names: dict) -> None:
    single = len(chats) == 1
    while (line := read_line()) is not None:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not command(text, chats, names):
                return
            continue
        replies = {}
        try:
            for key, c in chats.items():
                reply = run_reply(c, text, console, show_text=single, name=names[key])
                replies[names[key]] = reply
                console.print(stats_line(reply.stats) if single else f"{names[key]}: {stats_line(reply.stats)}",
                              style="dim", markup=False, soft_wrap=True)
                if reply.stats.stop == "interrupted":
                    skipped = [names[k] for k in list(chats)[len(replies):]]
                    if skipped:
                        console.print(f"skipped this message: {', '.join(skipped)}", style="yellow", markup=False)
                    break
        except UserError as e:
            console.print(f"error: {e}", style="red", markup=False, soft_wrap=True)
            continue
        if not single and replies:
            console.print(compare_table(replies))
            console.print(same_replies_note(replies))


def command(text: str, chats: dict, names: dict) -> bool:
    """Run a /command; False means leave."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/clear":
        for c in chats.values():
            c.clear()
        kept = any(c.system for c in chats.values())
        console.print("conversation cleared" + (" (the system message stays)" if kept else ""))
    elif name == "/system":
        for c in chats.values():
            c.system = arg or None
        console.print(f"system message set: {arg}" if arg else "system message removed", markup=False)
    elif name == "/stats":
        table = Table()
        table.add_column("")
        for key in chats:
            table.add_column(names[key])
        summaries = [c.summary() for c in chats.values()]
        for k in summaries[0]:
            table.add_row(k.replace("_", " "), *(fmt(s[k]) for s in summaries))
        console.print(table)
    elif name == "/help":
        console.print(HELP, markup=False)
    else:
        console.print(f"unknown command {name}; /help lists them", markup=False)
    return True
