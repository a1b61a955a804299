"""`billion chat` on both engines: one-shot prompts, the interactive loop in a real
pseudo-terminal, the base-model fallback template, context overflow, Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import sys

import pexpect
import pytest
from click.testing import CliRunner

from backends.base import Backend
from backends.types import GenerationConfig
from backends.text_stream import StopText
from billion.tasks.chat import Chat, transcript
from billion.cli import cli
from billion.commands.chat import stream_to
from tests.conftest import ENGINES

QUESTION = "Why is the sky blue?"
CPU = ["--device", "cpu", "--dtype", "float32"]


def greedy_reply(backend, text: str, max_tokens: int) -> str:
    """What the chat should answer, computed without it."""
    ids = backend.apply_chat_template([{"role": "user", "content": text}])
    return backend.detokenize(backend.generate(ids, GenerationConfig(max_tokens=max_tokens))).lstrip()


def run(args, **kw):
    result = CliRunner().invoke(cli, ["chat", *args], **kw)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.mark.parametrize("engine", ENGINES)
def test_prompt_prints_reply_and_stats(tiny_folder, tiny_model, results_dir, engine):
    folder = tiny_folder("tinyllama")
    result = run(["-m", str(folder), "-b", engine, *CPU, "-p", QUESTION, "-n", "12",
                  "--results-dir", str(results_dir)])
    expected = greedy_reply(tiny_model(engine), QUESTION, 12)
    assert expected and expected in result.stdout
    assert "12 tokens · TTFT" in result.stdout and "tok/s" in result.stdout
    (record_file,) = results_dir.glob("chat-*.json")
    record = json.loads(record_file.read_text())
    assert record["task"] == "chat" and record["backend"] == engine and record["reply"].startswith(expected)
    assert record["metrics"]["tokens"] == 12 and record["metrics"]["ttft_s"] > 0


def test_engines_same_greedy_reply_side_by_side(tiny_folder, results_dir):
    result = run(["-m", str(tiny_folder("tinyllama")), "-b", "all", *CPU, "-p", QUESTION, "-n", "24",
                  "--json", "--results-dir", str(results_dir)])
    records = [json.loads(line) for line in result.stdout.splitlines()]  # stdout holds only the JSON
    assert [r["backend"] for r in records] == ENGINES
    assert records[0]["reply"] and records[0]["reply"] == records[1]["reply"]
    assert len(records[0]["reply_token_ids"]) == 24 and records[0]["reply_token_ids"] == records[1]["reply_token_ids"]
    assert "identical replies (24 tokens)" in result.stderr and "TTFT s" in result.stderr


def test_draft_gives_the_same_greedy_reply(tiny_folder, results_dir):
    folder = str(tiny_folder("tinyllama"))
    args = ["-m", folder, "-b", "all", *CPU, "-p", QUESTION, "-n", "16", "--json", "--results-dir", str(results_dir)]
    plain = [json.loads(line) for line in run(args).stdout.splitlines()]
    # a draft that is not the target (its first layer only): its proposals are often wrong, and the
    # reply must still be the target's own, token for token
    drafted = [json.loads(line) for line in run(args + ["--draft", "layers:1", "--num-draft", "3"]).stdout.splitlines()]
    for p, d in zip(plain, drafted, strict=True):
        assert d["reply_token_ids"] == p["reply_token_ids"] and d["config"]["draft"] == f"{folder} first 1 layers"
        assert p["metrics"]["tokens_from_draft"] == 0
    bad = CliRunner().invoke(cli, ["chat", *args, "--draft", "tiny:pythia-1b"])  # checked as bench does
    assert bad.exit_code == 1 and "cannot draft" in bad.output and "Traceback" not in bad.output


def test_compare_models(tiny_folder, results_dir):
    result = run(["-m", "tiny:tinyllama", "--compare", "tiny:llama-3.2-1b,tiny:pythia-1b", "-b", "torch", *CPU,
                  "-p", QUESTION, "-n", "8", "--results-dir", str(results_dir)])
    for name in ("tiny:tinyllama (torch)", "tiny:llama-3.2-1b (torch)", "tiny:pythia-1b (torch)"):
        assert name in result.stdout
    assert "3 different replies (by token ids)" in result.stdout
    assert len(list(results_dir.glob("chat-*.json"))) == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_base_model_fallback_template(tiny_model, results_dir, engine):
    pythia = tiny_model(engine, "pythia-1b")
    assert not pythia.has_chat_template
    chat = Chat(pythia, GenerationConfig(max_tokens=6), system="Be brief.")
    reply = chat.ask("Hello")
    assert reply.prompt_ids == pythia.tokenize("Be brief.\n\nUser: Hello\nAssistant:")
    list(reply.pieces())
    assert [m["role"] for m in chat.turns] == ["user", "assistant"]
    assert chat.template == "fallback transcript"
    result = run(["-m", "tiny:pythia-1b", "-b", engine, *CPU, "-p", "Hello", "-n", "6",
                  "--results-dir", str(results_dir)])
    assert 'no chat template (a base model): using a plain transcript "User: …\\nAssistant:"' in result.stdout


def test_fallback_stops_at_the_next_user_line():
    stop = StopText(("\nUser:",))
    assert stop.push("It is") == ("It is", False)
    assert stop.push(" blue.\nUs") == (" blue.", False)  # "\nUs" may start a stop string: held back
    assert stop.push("e") == ("", False)
    assert stop.push("r: why?") == ("", True)
    stop = StopText(("\nUser:",))
    assert stop.push("a\nUs") == ("a", False)
    assert stop.push("ually") == ("\nUsually", False)  # not a stop string after all
    assert transcript([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                       {"role": "user", "content": "Bye"}]) == "User: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"


@pytest.mark.parametrize("engine", ENGINES)
def test_context_overflow_drops_oldest_turns(tiny_model, engine):
    backend = tiny_model(engine)
    chat = Chat(backend, GenerationConfig(max_tokens=40), system="Be brief.")
    long_message = "Paris is the capital of France. " * 18  # ~130 tokens of the tiny tokenizer
    dropped = 0
    for i in range(5):
        reply = chat.ask(f"{i}: {long_message}")
        list(reply.pieces())
        dropped += reply.stats.dropped_turns
        assert len(reply.prompt_ids) + 40 <= backend.context_length
    assert dropped > 0
    assert chat.messages()[0] == {"role": "system", "content": "Be brief."}
    assert chat.turns[0]["content"] != f"0: {long_message}" and chat.turns[-2]["content"] == f"4: {long_message}"
    turns = list(chat.turns)
    with pytest.raises(Exception, match="message too long.*context holds 512"):
        chat.ask(long_message * 4)
    assert chat.turns == turns  # a rejected message leaves the conversation as it was


def test_clear_errors(tiny_folder, tiny_model, results_dir, monkeypatch):
    folder = str(tiny_folder("tinyllama"))
    result = CliRunner().invoke(cli, ["chat", "-m", folder, "-b", "torch", *CPU, "-p", "Paris is in France. " * 200,
                                      "--results-dir", str(results_dir)])
    assert result.exit_code == 1 and "Error: message too long" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["chat", "-m", folder, "--json"])
    assert result.exit_code == 1 and "--json needs --prompt" in result.output
    backend = tiny_model("torch")
    monkeypatch.setattr(backend.tokenizer, "chat_template", "{{ raise_exception('System role not supported') }}")
    with pytest.raises(Exception, match="chat template rejected the conversation: System role not supported"):
        Chat(backend, GenerationConfig(max_tokens=4), system="Be brief.").ask("Hi")


def test_interactive_overflow_and_too_long_message_on_screen(tiny_folder, results_dir):
    long_message = "Paris is the capital of France. " * 18
    script = "\n".join([long_message] * 4 + [long_message * 4, "/stats", "/quit"]) + "\n"
    result = run(["-m", str(tiny_folder("tinyllama")), "-b", "torch", *CPU, "-n", "60",
                  "--results-dir", str(results_dir)], input=script)
    assert "outgrew the context of 512 tokens: dropped the" in result.stdout
    assert "error: message too long" in result.stdout
    assert "dropped turns" in result.stdout and "record:" in result.stdout


def test_ctrl_c_stops_the_reply_not_the_chat(tiny_folder, results_dir, monkeypatch):
    real_stream = Backend.stream
    calls = []

    def interrupted_stream(self, *args, **kw):  # Ctrl-C arriving after 3 tokens of the first reply
        calls.append(1)
        for n, chunk in enumerate(real_stream(self, *args, **kw)):
            if len(calls) == 1 and n == 3:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(Backend, "stream", interrupted_stream)
    result = run(["-m", str(tiny_folder("tinyllama")), "-b", "torch", *CPU, "-n", "10",
                  "--results-dir", str(results_dir)], input=f"{QUESTION}\nAgain\n/stats\n/quit\n")
    assert "3 tokens · TTFT" in result.stdout and "· interrupted" in result.stdout
    assert "10 tokens · TTFT" in result.stdout  # the next message is answered in full
    stats = next(line for line in result.stdout.splitlines() if "interrupted replies" in line)
    assert stats.split("│")[2].strip() == "1"
    messages = next(line for line in result.stdout.splitlines() if "│ messages" in line)
    assert messages.split("│")[2].strip() == "4"  # the partial reply stays in the conversation


def test_stream_writes_each_piece_as_it_comes():
    class Terminal(io.StringIO):
        flushed: list[str] = []

        def flush(self):
            self.flushed.append(self.getvalue())

    out = Terminal()
    stream_to(out, iter(["The", " sky", " is"]))
    assert out.flushed == ["The", "The sky", "The sky is"]


def spawn_chat(folder, engine, results_dir):
    env = dict(os.environ, TERM="dumb")  # BILLION_HOME: the test session's, set by conftest
    child = pexpect.spawn(sys.executable, ["-m", "billion", "chat", "-m", str(folder), "-b", engine, *CPU,
                                           "-n", "12", "--results-dir", str(results_dir)],
                          env=env, encoding="utf-8", timeout=90)
    child.expect("/help for commands")
    child.expect_exact("you> ")
    return child


@pytest.mark.parametrize("engine,leave", [("mlx", "/quit"), ("torch", "ctrl-d")])
def test_terminal_chat_streams_clears_and_exits(tiny_folder, tiny_model, results_dir, engine, leave):
    child = spawn_chat(tiny_folder("tinyllama"), engine, results_dir)
    child.sendline(QUESTION)
    child.expect(r"12 tokens · TTFT \S+ s · \S+ tok/s")
    answer = child.before.replace("\r\n", "\n").split(QUESTION + "\n", 1)[1]
    assert answer.strip() == greedy_reply(tiny_model(engine), QUESTION, 12).strip()
    child.expect_exact("you> ")
    child.sendline("/clear")
    child.expect_exact("conversation cleared")
    child.sendline("/stats")
    child.expect(r"messages\s+│\s+0 ")
    child.expect_exact("you> ")
    if leave == "/quit":
        child.sendline("/quit")
    else:
        child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert len(list(results_dir.glob("chat-*.json"))) == 1  # the session's record


def test_terminal_ctrl_c_at_the_prompt_exits_cleanly(tiny_folder, results_dir):
    child = spawn_chat(tiny_folder("tinyllama"), "mlx", results_dir)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before
