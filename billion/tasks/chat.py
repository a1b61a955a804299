"""A conversation with one model, engine-agnostic: history, prompt, one streamed reply with its timing.

`Chat` keeps one model's side of a conversation (system message + alternating
user/assistant messages), renders it with the model's chat template — or, for
base models without one, a plain "User: …\\nAssistant:" transcript — and drops
the oldest exchanges when the conversation no longer fits the model's context.
`Reply` streams one answer as text pieces and keeps its statistics (tokens,
time to first token, decode tok/s). The command line lives in
billion/commands/chat.py; nothing here prints.

The conversation's KV cache is kept from turn to turn (backends.batching.PromptCache, a batch of
one kept between prompts, a draft or not): each prompt reuses the tokens it shares with the last
prompt and reply and computes only the rest, so the time to first token of a later turn pays for
its new message, not the whole transcript. /clear and a new system message start it afresh.

Ctrl-C during a reply: the partial reply is kept in the history (the model's
next turn sees what was shown on screen); a reply interrupted before any text
removes its user message too, as if it had not been sent.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

from backends.base import Backend
from backends.batching import PromptCache
from backends.types import GenerationConfig, UserError
from backends.speculation import NgramDraft
from billion.tasks.timing import TimedStream

FALLBACK_TEMPLATE = 'no chat template (a base model): using a plain transcript "User: …\\nAssistant:"'
# A base model continues the transcript past its answer with the user's next
# line: the reply ends there.
FALLBACK_STOPS = ("\nUser:",)


def transcript(messages: list[dict]) -> str:
    """The fallback prompt for base models: the system text, then "User: …" / "Assistant: …" lines."""
    lines = []
    for m in messages:
        if m["role"] == "system":
            lines.append(m["content"] + "\n")
        else:
            lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}")
    return "\n".join(lines) + "\nAssistant:"


def render(backend: Backend, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of the prompt for `messages` (and `tools`, OpenAI-shaped, for a template that
    renders them), ending where the assistant's reply begins."""
    from jinja2 import TemplateError  # what templates raise, e.g. "System role not supported"

    if not backend.has_chat_template:
        return backend.tokenize(transcript(messages))
    try:
        return backend.apply_chat_template(messages, tools=tools)
    except TemplateError as e:
        raise UserError(f"the model's chat template rejected the conversation: {e}") from None


@dataclass
class ReplyStats:
    prompt_tokens: int
    tokens: int = 0  # generated, including any cut off by a stop string
    ttft_s: float | None = None  # from the call to the first token: prefill + first sample
    decode_tps: float | None = None  # tokens per second after the first
    total_s: float = 0.0
    stop: str = "running"  # eos | max_tokens | stop_string | interrupted | error
    tokens_from_draft: int = 0
    dropped_turns: int = 0  # oldest exchanges dropped to fit this prompt in the context
    cached_tokens: int = 0  # prompt tokens found in the conversation's KV cache (not computed again)

    @property
    def prefill_tps(self) -> float | None:
        return self.prompt_tokens / self.ttft_s if self.ttft_s else None

    def as_metrics(self) -> dict:
        return {**asdict(self), "prefill_tps": self.prefill_tps}


class Reply:
    """One assistant reply: iterate `pieces()` for its text as it is generated; `stats` and `text` after."""

    def __init__(self, chat: "Chat", prompt_ids: list[int], dropped: int):
        self.chat = chat
        self.prompt_ids = prompt_ids
        self.text = ""
        self.token_ids: list[int] = []  # compared across engines: random weights often decode to no text
        self.stats = ReplyStats(len(prompt_ids), dropped_turns=dropped)

    def pieces(self) -> Iterator[str]:
        chat, stats = self.chat, self.stats
        gen = chat.gen
        if not chat.backend.has_chat_template:  # stop strings are Backend.stream's (gen.stop)
            gen = replace(gen, stop=tuple(gen.stop) + FALLBACK_STOPS)
        run = TimedStream(chat.backend.stream(self.prompt_ids, gen, draft=chat.draft, num_draft=chat.num_draft,
                                              cache=chat.cache))
        chunks = iter(run)
        try:
            for chunk in chunks:
                text = chunk.text
                if not self.text:  # templates and transcripts leave a space or newline before the answer
                    text = text.lstrip()
                if text:
                    self.text += text
                    yield text
        finally:
            chunks.close()  # frees the engine's stream when the reader stops early
            stats.stop = {"stop": "stop_string", None: "interrupted"}.get(run.finish_reason, run.finish_reason)
            self.token_ids = list(run.tokens)
            stats.tokens, stats.tokens_from_draft = len(run.tokens), run.from_draft
            stats.cached_tokens = chat.cache.reused if chat.cache is not None else 0
            stats.total_s = time.perf_counter() - run.start
            if run.times:
                stats.ttft_s = run.ttft_s
                rate = run.decode_tps
                stats.decode_tps = None if rate != rate else rate  # NaN (one token) has no rate
            chat._finish(self)


@dataclass
class Chat:
    """One model's side of a conversation."""

    backend: Backend
    gen: GenerationConfig
    system: str | None = None
    draft: Backend | NgramDraft | None = None
    num_draft: int = 4
    turns: list[dict] = field(default_factory=list)  # alternating user / assistant messages
    replies: list[ReplyStats] = field(default_factory=list)
    # Reuse the conversation's KV cache from one turn to the next (PromptCache)
    prompt_cache: bool = True

    def __post_init__(self):
        self.cache = PromptCache(self.backend) if self.prompt_cache else None
        self._cached_system = self.system

    @property
    def template(self) -> str:
        return "chat template" if self.backend.has_chat_template else "fallback transcript"

    def messages(self, turns: list[dict] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.turns if turns is None else turns)

    def clear(self) -> None:
        self.turns = []
        if self.cache is not None:
            self.cache.reset()

    def ask(self, text: str) -> Reply:
        """Add the user's message and start the reply; the reply joins the history as it ends.

        Drops the oldest exchanges (never the system message) until prompt and
        reply fit the context; a message that cannot fit on its own is a UserError
        and leaves the history unchanged.
        """
        if not text.strip():
            raise UserError("empty message")
        context, reserve = self.backend.context_length, self.gen.max_tokens
        if reserve >= context:
            raise UserError(f"--max-tokens {reserve} leaves no room for a prompt in the model's context "
                            f"of {context} tokens")
        if self.cache is not None and self.system != self._cached_system:
            self.cache.reset()  # a new system message: the whole transcript changes
            self._cached_system = self.system
        turns = self.turns + [{"role": "user", "content": text}]
        dropped = 0
        while True:
            ids = render(self.backend, self.messages(turns))
            if len(ids) + reserve <= context:
                break
            if len(turns) == 1:
                raise UserError(
                    f"message too long: the prompt would be {len(ids)} tokens"
                    f"{' with the system message' if self.system else ''}, and {reserve} are kept for the "
                    f"reply, but the model's context holds {context}; shorten it or lower --max-tokens")
            turns = turns[2:]  # the oldest user message and its reply
            dropped += 1
        self.turns = turns
        return Reply(self, ids, dropped)

    def _finish(self, reply: Reply) -> None:
        if reply.stats.stop in ("interrupted", "error") and not reply.text:
            self.turns.pop()  # nothing was said: forget the question too
        else:
            self.turns.append({"role": "assistant", "content": reply.text})
        if reply.stats.stop != "error":
            self.replies.append(reply.stats)

    def context_tokens(self) -> int:
        """Tokens the conversation so far takes in the context."""
        return len(render(self.backend, self.messages())) if self.messages() else 0

    def summary(self) -> dict:
        """Session statistics, for /stats and the session record."""
        done = [r for r in self.replies if r.tokens]

        def mean(key):
            values = [getattr(r, key) for r in done if getattr(r, key) is not None]
            return statistics.mean(values) if values else None

        return {
            "replies": len(self.replies), "messages": len(self.turns),
            "context_tokens": self.context_tokens(), "context_length": self.backend.context_length,
            "generated_tokens": sum(r.tokens for r in self.replies),
            "dropped_turns": sum(r.dropped_turns for r in self.replies),
            "interrupted_replies": sum(r.stop == "interrupted" for r in self.replies),
            "mean_ttft_s": mean("ttft_s"), "mean_decode_tps": mean("decode_tps"),
            "tokens_from_draft": sum(r.tokens_from_draft for r in self.replies),
        }
