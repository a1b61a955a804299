"""From a stream of token ids to a stream of text Chunks: incremental detokenizing, EOS, the
max_tokens limit and stop strings (Backend.stream's text side, whatever decode loop made the tokens)."""

from __future__ import annotations

import time
from typing import Iterator

from backends.types import Chunk, GenerationConfig


class StopText:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to show now, whether a stop string was reached)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class IncrementalDetokenizer:
    """Turns a token stream into text pieces.

    Decodes the tokens of the current line together (SentencePiece drops a
    leading space when a token is decoded alone) and holds text back while it
    ends in an incomplete UTF-8 character (U+FFFD), like transformers'
    TextStreamer; the cost per token is one decode of the current line.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.line: list[int] = []
        self.emitted = 0

    def add(self, token: int) -> str:
        self.line.append(token)
        text = self.tokenizer.decode(self.line, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted :]
        if text.endswith("\n"):
            self.line, self.emitted = [], 0
        else:
            self.emitted = len(text)
        return piece


def untagged(tokens: Iterator[int]) -> Iterator[tuple[int, bool]]:
    """(token, from_draft=False) for a decode loop without a draft; closing it closes `tokens`."""
    try:
        for token in tokens:
            yield token, False
    finally:
        close = getattr(tokens, "close", None)
        if close:
            close()


def chunks(tokens: Iterator[tuple[int, bool]], tokenizer, eos_ids: frozenset[int],
           gen: GenerationConfig) -> Iterator[Chunk]:
    """One Chunk per (token, from_draft), timed as it arrives. Stops at EOS (unless
    gen.ignore_eos; the EOS token itself is not yielded), after gen.max_tokens (that chunk's
    finish_reason is "max_tokens"), or at a stop string (gen.stop: the chunk that completes it has
    finish_reason "stop" and the text before it; while the text so far could be the start of one,
    chunks are held back, then delivered with their own timestamps). Closes `tokens` when done."""
    detok = IncrementalDetokenizer(tokenizer)
    stop = StopText(tuple(gen.stop)) if gen.stop else None
    held: list[tuple[int, float, bool]] = []  # chunks whose text may start a stop string
    ready = ""  # text safe to deliver with the held chunks
    try:
        for n, (token, from_draft) in enumerate(tokens):
            now = time.perf_counter()
            if token in eos_ids and not gen.ignore_eos:
                break
            last = n + 1 >= gen.max_tokens
            piece = detok.add(token)
            if stop is None:
                yield Chunk(token, piece, now, from_draft, "max_tokens" if last else None)
                if last:
                    break
                continue
            text, hit = stop.push(piece)
            ready += text
            held.append((token, now, from_draft))
            reason = "stop" if hit else "max_tokens" if last else None
            if reason is None and stop.held:
                continue
            if reason == "max_tokens":
                ready += stop.flush()
            yield from _release(held, ready, reason)
            held, ready = [], ""
            if reason:
                break
        if held:  # EOS (or the end) with text held back: it was no stop string after all
            yield from _release(held, ready + stop.flush(), None)
    finally:
        tokens.close()


def _release(held: list, text: str, reason: str | None) -> Iterator[Chunk]:
    for token, now, from_draft in held[:-1]:
        yield Chunk(token, "", now, from_draft)
    token, now, from_draft = held[-1]
    yield Chunk(token, text, now, from_draft, reason)
