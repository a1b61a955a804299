"""Constrained decoding (backends/constraints.py): the grammar's mask inside the one sampling rule,
the same in the shared decode loop and the batch scheduler, with prompt-lookup drafts, and the
schemas it refuses; and log-probabilities (sampling.logprobs)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from backends import constraints, sampling
from backends.batching import BatchGenerator
from backends.types import GenerationConfig
from tests.doubles import FixedBatch, FixedLogits, scheduled

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(real_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_folder)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return constraints.Grammars(tokenizer, 49152, [EOS])


def fixed_engine(grammars, seed=0):
    """An engine whose logits never change (and favour no digit, no 'yes'), with SmolLM2's vocabulary."""
    engine = FixedLogits(np.random.default_rng(seed).normal(0, 3, 49152).astype(np.float32))
    engine.grammars, engine.eos_ids = grammars, frozenset([EOS])
    return engine


def tokens_of(engine, prompt, gen) -> list[int]:
    return [t for t, _ in scheduled(engine, prompt, gen)]


def until_eos(tokens, limit=60) -> list[int]:
    out = []
    for t in tokens:
        if t == EOS or len(out) == limit:
            break
        out.append(t)
    return out


def test_the_mask_is_step_zero_of_the_rule():
    logits = np.array([3.0, 1.0, 2.0, 0.5, -1.0], dtype=np.float32)
    allowed = np.array([False, True, True, False, True])
    greedy = sampling.distribution(logits, GenerationConfig(), allowed=allowed)
    assert greedy.tolist() == [0, 0, 1, 0, 0]  # the allowed argmax, not the overall one
    p = sampling.distribution(logits, GenerationConfig(temperature=0.7), allowed=allowed)
    x = np.exp(logits[allowed] / 0.7)
    assert np.allclose(p[allowed], x / x.sum()) and (p[~allowed] == 0).all()
    top1 = sampling.distribution(logits, GenerationConfig(temperature=1.0, top_k=1), allowed=allowed)
    assert top1.tolist() == [0, 0, 1, 0, 0]
    with pytest.raises(sampling.SamplingError, match="allows no next token"):
        sampling.distribution(logits, GenerationConfig(), allowed=np.zeros(5, bool))


@pytest.mark.parametrize("gen", [GenerationConfig(max_tokens=60),
                                 GenerationConfig(max_tokens=60, temperature=1.0, seed=7),
                                 GenerationConfig(max_tokens=60, temperature=0.8, top_p=0.9, seed=3,
                                                  repetition_penalty=1.3)])
def test_the_grammar_wins_over_the_logits_alone_or_in_a_batch(grammars, tokenizer, gen):
    """A batch of one (Backend.stream's, any engine) and a batch with neighbours draw the same
    constrained tokens from the same logits; the text matches the grammar though the logits would
    never write it."""
    pattern = r"(yes|no), [0-9]{2} items"
    gen = GenerationConfig(**{**gen.__dict__, "grammar": constraints.regex(pattern)})
    engine = fixed_engine(grammars)
    free = until_eos(tokens_of(engine, [1, 2, 3], GenerationConfig(max_tokens=20)))
    assert not re.fullmatch(pattern, tokenizer.decode(free))
    alone = until_eos(tokens_of(engine, [1, 2, 3], gen))
    assert re.fullmatch(pattern, tokenizer.decode(alone)), tokenizer.decode(alone)

    batch = BatchGenerator(FixedBatch(engine.row), frozenset([EOS]), max_batch=4, constrain=grammars.matcher)
    other = GenerationConfig(max_tokens=8, temperature=1.0, seed=1)  # unconstrained neighbour in the batch
    uids = [batch.add([1, 2, 3], gen), batch.add([1, 2, 3], other), batch.add([1, 2, 3], gen)]
    tokens = {u: [] for u in uids}
    while batch.busy:
        for e in batch.step():
            if e.token is not None and e.token != EOS:
                tokens[e.uid].append(e.token)
    assert tokens[uids[0]] == alone and tokens[uids[2]] == alone
    assert not re.fullmatch(pattern, tokenizer.decode(tokens[uids[1]]))


def test_a_json_schema_constrains_to_valid_json(grammars, tokenizer):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "n", "tags", "ok"],
              "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "minimum": 3},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                             "ok": {"type": "boolean"}}}
    engine = fixed_engine(grammars, seed=4)
    gen = GenerationConfig(max_tokens=80, temperature=1.0, seed=2, grammar=constraints.json_schema(schema))
    text = tokenizer.decode(until_eos(tokens_of(engine, [1], gen), 80))
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("schema, part", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ([1, 2], "must be a JSON object"),
])
def test_what_cannot_be_enforced_is_refused_by_name(schema, part):
    with pytest.raises(constraints.ConstraintError, match=re.escape(part)):
        constraints.json_schema(schema)


def test_grammar_and_ignore_eos_are_refused():
    with pytest.raises(sampling.UserError, match="ignore_eos"):
        sampling.normalized(GenerationConfig(ignore_eos=True, grammar=constraints.json_object()))


def test_prompt_lookup_drafts_the_grammar_forbids_are_rejected(real_model):
    """With --draft ngram inside a batch, proposals go through the grammar too: the output is the
    constrained greedy output without drafts (lossless), though the prompt's repetition keeps
    proposing words where the grammar wants digits."""
    from backends.speculation import NgramDraft

    b = real_model("torch")
    prompt = b.apply_chat_template([{"role": "user", "content": "Repeat: one two three one two three one two"}])
    gens = [GenerationConfig(max_tokens=24, grammar=constraints.regex(r"[0-9]{3}( [0-9]{3}){0,9}")),
            GenerationConfig(max_tokens=24, grammar=constraints.regex(r"(one two three ?){1,4}"))]
    plain = b.batch(max_batch=2)
    want = [drive(plain, prompt, g) for g in gens]
    batch = b.batch(max_batch=2, draft=NgramDraft(2), num_draft=4)
    got = [drive(batch, prompt, g) for g in gens]
    assert got == want
    assert re.fullmatch(r"(one two three ?){1,4}", b.detokenize(got[1]).strip())
    assert batch.stats.drafted > batch.stats.accepted > 0


def drive(batch, prompt, gen) -> list[int]:
    uid, out = batch.add(prompt, gen), []
    while batch.busy:
        out += [e.token for e in batch.step() if e.uid == uid and e.token is not None]
    return out


def test_logprobs_are_the_log_softmax_of_the_logits():
    logits = np.array([1.0, 3.0, 3.0, -2.0], dtype=np.float32)
    lp, top = sampling.logprobs(logits, 3, 3)
    direct = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    assert lp == pytest.approx(direct[3])
    assert [t for t, _ in top] == [1, 2, 0]  # ties by lower id
    assert [v for _, v in top] == pytest.approx(direct[[1, 2, 0]].tolist())
    assert sampling.logprobs(logits, 0, 0)[1] == ()


def test_chat_cli_json_schema_and_regex_on_both_engines(tiny_folder, results_dir, tmp_path):
    """billion chat --json-schema FILE / --regex: random weights write valid JSON (and the same on
    both engines), and a bad schema file is a one-line error naming the file and line."""
    from click.testing import CliRunner

    from billion.cli import cli

    schema = {"type": "object", "required": ["n", "ok"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    base = ["chat", "-m", str(tiny_folder("tinyllama")), "-b", "all", "--device", "cpu", "--dtype", "float32",
            "-p", "Hi", "-n", "24", "--json", "--results-dir", str(results_dir)]
    result = CliRunner().invoke(cli, base + ["--json-schema", str(path)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[0]["reply_token_ids"] == records[1]["reply_token_ids"]
    assert set(json.loads(records[0]["reply"])) == {"n", "ok"}
    assert records[0]["config"]["json_schema"] == str(path)
    result = CliRunner().invoke(cli, base + ["--regex", r"[a-c]{3}-[0-9]{2}"])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", json.loads(result.stdout.splitlines()[0])["reply"])
    path.write_text('{"type": "object",\n "properties": }')
    result = CliRunner().invoke(cli, base + ["--json-schema", str(path)])
    assert result.exit_code != 0 and f"{path}:2: not JSON" in result.output and "Traceback" not in result.output
    path.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    result = CliRunner().invoke(cli, base + ["--json-schema", str(path)])
    assert result.exit_code != 0 and "uniqueItems" in result.output


def count_compiles(monkeypatch) -> list:
    """Every llguidance matcher compiled from grammar text from now on (one entry each)."""
    llg = constraints._llg()
    compiled = []

    class CountingMatcher:  # llguidance.LLMatcher, its constructions counted
        def __getattr__(self, name):  # grammar_from_json_schema, validate_grammar, ...
            return getattr(llg.LLMatcher, name)

        def __call__(self, *args, **kw):
            compiled.append(args[1])
            return llg.LLMatcher(*args, **kw)

    class Counting:
        LLMatcher = CountingMatcher()

        def __getattr__(self, name):
            return getattr(llg, name)

    monkeypatch.setattr(constraints, "_llg", lambda: Counting())
    return compiled


def test_a_grammar_is_compiled_once_and_each_generation_starts_from_a_copy(tokenizer, monkeypatch):
    g = constraints.Grammars(tokenizer, 49152, [EOS])
    pattern, other = constraints.regex(r"(yes|no)"), constraints.regex(r"[0-9]+")
    compiled = count_compiles(monkeypatch)
    first, second = g.matcher(pattern), g.matcher(pattern)
    assert compiled == [pattern]  # the second is a copy of the first's compiled grammar
    first.advance(tokenizer.encode("yes")[0])
    assert (first.allowed() != second.allowed()).any()  # copies: one advancing leaves the other
    assert (second.allowed() == first_allowed(g, pattern)).all()  # a copy starts at the start
    assert len(compiled) == 1
    g.matcher(other)
    assert compiled == [pattern, other]
    with pytest.raises(constraints.ConstraintError):
        g.matcher('start: "a" | %json { "type": "nonsense" }')


def first_allowed(g, grammar):
    return g.matcher(grammar).allowed()
