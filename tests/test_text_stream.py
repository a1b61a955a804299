"""The text side of a stream: incremental detokenizing adds up to the decoding of all the tokens
(spaces after newlines, characters split across tokens, special tokens) at a bounded cost per
token, and stop strings are matched in the text as it streams."""

from __future__ import annotations

import pytest

from backends.text_stream import IncrementalDetokenizer, StopText

TEXTS = ["Hello world.\n  Indented line\n\nAnd a last one with émojis 🙂🚀 and 漢字.",
         "def f(x):\n    return x * 2\n\n\nprint(f(3))  # 6",
         "no newline at all " * 200]


def tokenizers(tiny_folder, real_folder):
    from backends.folders import hf_folder

    yield "tiny llama", hf_folder.load_tokenizer(tiny_folder("tinyllama"), False)
    yield "SmolLM2 (real)", hf_folder.load_tokenizer(real_folder, False)


def test_pieces_add_up_to_the_whole_decoding(tiny_folder, real_folder):
    for name, tok in tokenizers(tiny_folder, real_folder):
        for text in TEXTS:
            ids = tok.encode(text, add_special_tokens=True)
            detok = IncrementalDetokenizer(tok)
            streamed = "".join(detok.add(t) for t in ids)
            assert streamed == tok.decode(ids, skip_special_tokens=True), (name, text[:30])


def test_the_cost_per_token_does_not_grow_with_the_line(tiny_folder):
    """A line of 2000 tokens: each token decodes a window of a few tokens, not the line so far."""
    from backends.folders import hf_folder

    tok = hf_folder.load_tokenizer(tiny_folder("tinyllama"), False)

    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, **kw):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, **kw)

    counting = Counting()
    detok = IncrementalDetokenizer(counting)
    ids = tok.encode("word " * 2000, add_special_tokens=False)
    for t in ids:
        detok.add(t)
    assert len(ids) >= 1000 and counting.longest <= 8


@pytest.mark.parametrize("stops, pieces, shown", [
    (("STOP",), ["Hello ", "ST", "OP", " never"], "Hello "),
    (("\nUser:",), ["a\n", "Use", "d it"], "a\nUsed it"),  # held back, then released: no stop after all
])
def test_stop_strings_cost_their_length_per_piece(stops, pieces, shown):
    stop, text, hit = StopText(stops), "", False
    for piece in pieces:
        out, hit = stop.push(piece)
        text += out
        assert len(stop.held) < max(len(s) for s in stops)  # only a possible start of a stop is held
        if hit:
            break
    text += "" if hit else stop.flush()
    assert text == shown
