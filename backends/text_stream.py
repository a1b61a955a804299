"""From token ids to text Chunks: incremental detokenizing, EOS, the max_tokens limit and stop
strings, one generation at a time (pushed a token at a time by batching.Output)."""

from __future__ import annotations

from backends.types import Chunk, GenerationConfig


class StopText:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.matched: str | None = None  # the stop string that was reached (the earliest in the text)

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to show now, whether a stop string was reached)."""
        text = self.held + piece
        hits = [(i, s) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            at, self.matched = min(hits, key=lambda hit: hit[0])
            return text[:at], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class IncrementalDetokenizer:
    """Turns a token stream into text pieces, at a bounded cost per token.

    Each new token is decoded together with the token(s) before it (SentencePiece drops a leading
    space when a token is decoded alone, and a character can span tokens), as text-generation-
    inference and vLLM do: `before` = the window up to the last emitted token, `after` = the same
    window plus what came since; the new text is what `after` adds. The window then moves on, so a
    token costs a decode of a few tokens however long the line (not the whole line again). Text is
    held back while it ends in an incomplete UTF-8 character (U+FFFD). The pieces add up to the
    decoding of all the tokens.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # the window's first token
        self.read = 0  # tokens whose text has been emitted

    def add(self, token: int) -> str:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet (a special token, or half a character)
        self.prefix, self.read = self.read, len(self.tokens)
        return after[len(before):]


class TextStream:
    """One generation's text side, fed a token at a time (push): detokenizing, EOS, max_tokens and
    stop strings, pushed each request's tokens as its batch produces them (batching.Output).

    Stops at EOS (unless gen.ignore_eos; the EOS token itself makes no chunk), after gen.max_tokens
    (that chunk's finish_reason is "max_tokens"), or at a stop string (gen.stop: the chunk that
    completes it has finish_reason "stop" and the text before it; while the text so far could be
    the start of one, chunks are held back, then delivered with their own timestamps). `finished`
    says which ("eos", "max_tokens", "stop"), None while it runs.
    """

    def __init__(self, tokenizer, eos_ids: frozenset[int], gen: GenerationConfig):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = StopText(tuple(gen.stop)) if gen.stop else None
        self.eos_ids, self.gen = eos_ids, gen
        self.count = 0
        self.held: list[tuple[int, float, bool]] = []  # chunks whose text may start a stop string
        self.ready = ""  # text safe to deliver with the held chunks
        self.finished: str | None = None

    def push(self, token: int, now: float, from_draft: bool = False) -> list[Chunk]:
        if token in self.eos_ids and not self.gen.ignore_eos:
            self.finished = "eos"
            return self.close()
        self.count += 1
        last = self.count >= self.gen.max_tokens
        piece = self.detok.add(token)
        if self.stop is None:
            self.finished = "max_tokens" if last else None
            return [Chunk(token, piece, now, from_draft, self.finished)]
        text, hit = self.stop.push(piece)
        self.ready += text
        self.held.append((token, now, from_draft))
        reason = "stop" if hit else "max_tokens" if last else None
        if reason is None and self.stop.held:
            return []
        if reason == "max_tokens":
            self.ready += self.stop.flush()
        self.finished = reason
        return self._release(reason)

    def close(self) -> list[Chunk]:
        """What is still held back at the end (EOS, or the token stream ran out): it was no stop
        string after all."""
        if not self.held:
            return []
        self.ready += self.stop.flush()
        return self._release(None)

    def _release(self, reason: str | None) -> list[Chunk]:
        held, text = self.held, self.ready
        self.held, self.ready = [], ""
        out = [Chunk(token, "", now, from_draft) for token, now, from_draft in held[:-1]]
        token, now, from_draft = held[-1]
        return out + [Chunk(token, text, now, from_draft, reason)]
