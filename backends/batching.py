"""The one scheduler: every generated token comes from here, on every engine.

Decoding a small model reads every weight once per step; a batch of B sequences reads them once
for B tokens. BatchGenerator (below) serves every engine; an engine supplies only its batched KV
cache (BatchCache): prefill one sequence alone, add it as a row, decode one token for every row in
one forward pass, keep some rows. Requests wait in a queue, join the batch at the next step when a
slot is free, and leave it when they finish or are cancelled. A single generation (Backend.stream:
chat, bench, speculate, eval, humaneval) is a batch of one, on the engine's KV session
(sessions.SessionBatchCache) or torch's compiled static cache: the same admission, sampling,
speculation, grammar and logprobs code as the server's batch of eight.

Sampling is billion's one rule (backends/sampling.py), row by row on each row's float32 logits,
with each request's own numpy generator seeded by its own seed: a request's tokens do not depend
on what else is in the batch, as far as the engine's logits for it do not. No row sees another's
tokens, penalties, stop strings, grammar state or cache.

A request with a grammar (gen.grammar) has a matcher of its own (backends/constraints.py): its
mask goes into the sampling rule, and with a draft a drafted token the grammar forbids is
rejected like any other the target would not have drawn.

Speculative decoding (a draft model or prompt lookup, backends/speculation.py) is a step of the
same scheduler: every row drafts with its own proposer, one verification pass covers every row's
proposals, and speculation.accept keeps the target's distribution row by row.

The prompt cache keeps the KV rows of the last finished or cancelled requests (their prompt and
reply): a new request whose prompt starts with one of them (the next turn of a conversation)
prefills only what is new.

Each request's side of the events (its text, logprobs and finish reason) is an Output, the same
for the server, generate_all and Backend.stream.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np

from backends import sampling, speculation
from backends.text_stream import TextStream
from backends.types import Chunk, GenerationConfig


class BatchCache(ABC):
    """An engine's batched KV cache, rows in the order they were added (minus those dropped).
    A row's cache is whatever the engine uses for one sequence (opaque to the scheduler)."""

    crop_copies = True  # crop() leaves its argument as it was (else a prompt-cache entry is used up)
    cannot_verify = "its rows cannot be verified and rewound one by one"  # why verify() is left out, if it is

    def expect(self, prompt_tokens: int, gen: GenerationConfig) -> None:
        """The next prefill starts a row for a prompt of `prompt_tokens` generated with `gen`: a
        cache of fixed shape (torch's compiled static cache) sizes itself by it, MLX's batch of one
        decides whether to run ahead on the device's argmax; others ignore it."""

    @abstractmethod
    def prefill(self, ids: Sequence[int], prefix=None) -> tuple[object, np.ndarray]:
        """A one-row cache holding `ids` after `prefix` (a one-row cache of earlier tokens, which
        may be used up), and float32 logits [vocab] of the last position."""

    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> list[tuple[object, np.ndarray]]:
        """prefill() of each prompt from nothing (no prefix), as (one-row cache, logits) pairs: in
        one forward pass where the engine can (torch), one by one here."""
        return [self.prefill(ids) for ids in prompts]

    @abstractmethod
    def add(self, row) -> None:
        """Append a one-row cache as the batch's last row (left-padded to the batch's length)."""

    @abstractmethod
    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed one token per row (in row order); float32 logits [rows, vocab]."""

    def verify(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Feed each row its own tokens (the last one and a draft's proposals; rows may differ in
        length) in one forward pass; float32 logits [len(row), vocab] per row. Engines that cannot
        leave this out: prompt lookup inside a batch is then refused."""
        raise NotImplementedError

    def rewind(self, row: int, count: int) -> None:
        """Forget the last `count` tokens verify() fed to `row` (its rejected proposals)."""
        raise NotImplementedError

    @abstractmethod
    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order (the others leave the batch)."""

    @abstractmethod
    def extract(self, row: int):
        """A one-row copy of a row's cache, without its padding (for the prompt cache)."""

    @abstractmethod
    def crop(self, row_cache, length: int):
        """A one-row cache holding the first `length` tokens of `row_cache` (a copy)."""


class OneRowCache(BatchCache):
    """A batch of one (a single generation, or an engine that serves one request at a time): its
    row is the one-row cache itself, added, cropped and taken out in place, never copied."""

    crop_copies = False  # a row is cropped in place (a prompt-cache entry is used up)
    row = None

    def add(self, row) -> None:
        self.row = row

    def keep(self, rows: Sequence[int]) -> None:
        if not rows:
            self.row = None

    def extract(self, row: int):
        return self.row  # it leaves the batch: no copy needed


@dataclass(frozen=True)
class BatchEvent:
    """One request's news from a step: a token, and why it finished if it did."""

    uid: int
    token: int | None  # None: finished without a new token (cancelled, or an error)
    finish_reason: str | None = None  # "eos" | "max_tokens" | "cancelled" | "error"
    time_s: float = 0.0  # perf_counter after the token was computed
    cached_tokens: int = 0  # prompt tokens the first event's prefill found in the prompt cache
    # why, with finish_reason "error": that request's alone, the batch goes on. A UserError (a
    # sampling setting that cannot work) is the client's; anything else is the engine's.
    error: Exception | None = None
    # with gen.logprobs: (token's log-probability, ((token, log-probability), ...) the most likely)
    logprobs: tuple | None = None
    from_draft: bool = False  # a drafted token the target accepted


@dataclass
class _Request:
    uid: int
    prompt: list[int]
    gen: GenerationConfig
    rng: np.random.Generator
    output: list[int] = field(default_factory=list)
    logits: np.ndarray | None = None  # for the next token
    proposer: object | None = None  # its drafts (speculation.proposer), when the batch speculates
    failed: bool = False  # its own work failed: it leaves, and its cache is not worth keeping
    salt: str | None = None  # its prompt-cache partition: it reuses only rows cached under the same salt
    matcher: object | None = None  # its place in gen.grammar (constraints.Matcher)
    # while its prompt goes in chunk by chunk: its one-row cache so far, and how much of the prompt
    # it holds (the cached prefix included); `reused` is that prefix's length
    partial: object | None = None
    fed: int = 0
    reused: int = 0


class BatchGenerator:
    """Requests in, tokens out, decoded together. Not thread-safe: one thread drives it (the
    server's worker); add() and cancel() are called from that thread between steps."""

    def __init__(self, cache: BatchCache, eos_ids: frozenset[int], *, max_batch: int = 8,
                 prompt_cache_size: int = 8, draft=None, num_draft: int = 4, vocab_size: int = 0,
                 constrain: Callable | None = None, prefill_chunk: int | None = None, stats=None):
        self.cache = cache
        # prompt tokens prefilled per step at most (None: each admitted prompt whole). A long prompt
        # then goes in over several steps, the rows decoding between its chunks, and a request that
        # leaves while its prompt goes in costs at most one chunk more.
        self.prefill_chunk = prefill_chunk
        self.prefilling: _Request | None = None  # a prompt part-way in
        self.constrain = constrain  # grammar text -> constraints.Matcher (Backend.grammars.matcher)
        # speculative decoding (a draft model, or a speculation.NgramDraft): each row drafts with its
        # own proposer; `stats` (a SpeculationStats) counts every round of every row
        if draft is not None:
            speculation.check(draft, vocab_size, num_draft)
        self.draft, self.num_draft, self.vocab_size = draft, num_draft, vocab_size
        self.stats = stats if stats is not None else speculation.SpeculationStats()
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self.waiting: deque[_Request] = deque()
        self.rows: list[_Request] = []  # in the cache's row order
        # (salt, fed ids) -> one-row cache: a request sees only rows cached under its own salt
        self.prompt_cache: OrderedDict[tuple, object] = OrderedDict()
        self.prompt_cache_size = prompt_cache_size
        self._uids = itertools.count()
        self._cancelled: set[int] = set()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting or self.prefilling)

    def add(self, prompt_ids: Sequence[int], gen: GenerationConfig, salt: str | None = None) -> int:
        """Queue a request; `salt` partitions the prompt cache (the server's cache_salt, or API key)."""
        if not prompt_ids:
            raise ValueError("an empty prompt has no next token")
        uid = next(self._uids)
        gen = sampling.normalized(gen)
        request = _Request(uid, list(prompt_ids), gen, np.random.default_rng(gen.seed), salt=salt)
        if gen.grammar is not None:
            if self.constrain is None:
                raise sampling.SamplingError("this batch generator has no grammar support")
            request.matcher = self.constrain(gen.grammar)
        if self.draft is not None and not sampling.uses_history(gen):  # penalties: plain steps
            stop = frozenset() if gen.ignore_eos else self.eos_ids
            request.proposer = speculation.proposer(self.draft, self.vocab_size, request.prompt, gen,
                                                    request.rng, stop)
        self.waiting.append(request)
        return uid

    def cancel(self, uid: int) -> None:
        """The request leaves at the next step (queued, part-way through its prompt, or decoding), with
        finish reason "cancelled"."""
        self._cancelled.add(uid)

    def step(self, news: Callable[[], bool] | None = None) -> list[BatchEvent]:
        """Admit waiting requests into free rows (whole prompts that arrived together prefilled
        together, a prompt with a cached prefix or one too long for this step's prefill budget
        alone; each first token sampled from the prefill), then decode one token for every row in
        one forward pass. `news()` true after a prefill stops admitting for this step: the driver
        has something to say first (the server: a cancel is waiting, so a client that leaves costs
        at most the prefill under way)."""
        events = self._drop_cancelled()
        budget = self.prefill_chunk or float("inf")
        while (self.prefilling or self.waiting) and len(self.rows) < self.max_batch and budget > 0:
            together = self._whole_prompts(budget)
            if len(together) > 1:
                events += self._admit_together(together)
                budget -= sum(len(r.prompt) for r in together)
                if news is not None and news():
                    break
                continue
            r, self.prefilling = self.prefilling or self.waiting.popleft(), None
            event, used = self._admit(r, budget)
            budget -= used
            if event is None:
                self.prefilling = r  # its prompt goes on at the next step
            else:
                events.append(event)
            if news is not None and news():
                break
        self._drop_finished(events)
        proposals = self._proposals()
        if any(drafted for drafted, _ in proposals):
            events += self._speculative_step(proposals)
        elif self.rows:
            try:
                logits = self.cache.decode([r.output[-1] for r in self.rows])
            except Exception as e:  # noqa: BLE001 - one forward pass for every row: they all fail, the queue goes on
                failed = [self._fail(r, e, time.perf_counter()) for r in self.rows]
                self._keep([])
                return events + failed
            now = time.perf_counter()
            decoded = []
            for r, row_logits in zip(self.rows, logits):
                r.logits = row_logits
                decoded.append(self._sample(r, now))
            self._drop_finished(decoded)
            events += decoded
        return events

    # ------------------------------------------------------------ internals

    def _proposals(self) -> list[tuple[list[int], list[np.ndarray]]]:
        """Each row's drafted tokens and the distributions q_i they were drawn from (none without a
        proposer or a match), never past its max_tokens. A row's round counts in the statistics
        even when it proposes nothing (speculation.SpeculationStats.no_match)."""
        out = []
        for r in self.rows:
            k = min(self.num_draft, r.gen.max_tokens - len(r.output) - 1)
            out.append(r.proposer.propose(r.prompt + r.output, k) if r.proposer and k > 0 else ([], []))
            if r.proposer and k > 0 and not out[-1][0]:
                self.stats.record(0, 0)
        return out

    def _speculative_step(self, proposals: list[tuple[list[int], list[np.ndarray]]]) -> list[BatchEvent]:
        """One verification pass for every row (its last token and its proposals), the acceptance
        rule per row (speculation.accept: greedy output is the target's own, sampled output keeps
        its distribution), then the rejected proposals forgotten (rewind)."""
        logits = self.cache.verify([[r.output[-1]] + d for r, (d, _) in zip(self.rows, proposals)])
        now = time.perf_counter()
        events = []
        for i, (r, (proposed, q), rows) in enumerate(zip(self.rows, proposals, logits)):
            # proposals from the first one the grammar forbids on would be rejected: drop them (the
            # position then draws from the target's own distribution, as a rejection would)
            drafted = proposed[:r.matcher.valid_prefix(proposed)] if r.matcher else proposed
            try:
                masks = self._masks(r, drafted)
                p = [sampling.distribution(rows[j], r.gen, r.prompt, r.output + drafted[:j], masks[j])
                     for j in range(len(drafted) + 1)]
                accepted, nxt = speculation.accept(drafted, q[:len(drafted)], p, r.rng)
            except Exception as e:  # noqa: BLE001 - this row's sampling, grammar or logprobs: it fails alone
                events.append(self._fail(r, e, now))
                continue
            if proposed:
                self.stats.record(len(proposed), accepted)
            self.cache.rewind(i, len(proposed) - accepted)
            for j, token in enumerate(drafted[:accepted] + [nxt]):
                event = self._emit(r, token, now, rows[j], from_draft=j < accepted)
                events.append(event)
                if event.finish_reason:
                    break
        self._drop_finished(events)
        return events

    @staticmethod
    def _masks(r: _Request, drafted: list[int]) -> list:
        """The grammar's mask before each drafted token and after the last (None without a grammar)."""
        if r.matcher is None:
            return [None] * (len(drafted) + 1)
        masks = [r.matcher.allowed()]
        for token in drafted:
            r.matcher.advance(token)
            masks.append(r.matcher.allowed())
        r.matcher.rollback(len(drafted))  # _emit takes the accepted ones
        return masks

    @property
    def queued(self) -> list[int]:
        """The uids still waiting for a slot."""
        return [r.uid for r in self.waiting]

    def _whole_prompts(self, budget: float) -> list[_Request]:
        """The waiting requests, from the front, that can be prefilled together: whole prompts
        within `budget`, with free rows for them, nothing of them in the prompt cache (a cached
        prefix is prefilled from, alone), none part-way in."""
        together: list[_Request] = []
        room = self.max_batch - len(self.rows)
        for r in itertools.islice(self.waiting, room) if not self.prefilling else ():
            if len(r.prompt) > budget or self._cached_prefix_length(r.prompt, r.salt)[1]:
                break
            together.append(r)
            budget -= len(r.prompt)
        return together

    def _admit_together(self, together: list[_Request]) -> list[BatchEvent]:
        """Prefill several whole prompts in one forward pass (BatchCache.prefill_many); each joins the
        batch and samples its first token. If that pass fails, each is admitted alone (and fails alone)."""
        for _ in together:
            self.waiting.popleft()
        try:
            for r in together:
                self.cache.expect(len(r.prompt), r.gen)
            done = self.cache.prefill_many([r.prompt for r in together])
        except Exception:  # noqa: BLE001 - which request's? each alone says
            return [self._admit(r, float("inf"))[0] for r in together]
        events = []
        for r, (row, logits) in zip(together, done):
            r.logits, r.fed = logits, len(r.prompt)
            events.append(self._join(r, row))
        return events

    def _admit(self, r: _Request, budget: float) -> tuple[BatchEvent | None, int]:
        """Prefill up to `budget` more of the request's prompt, alone; once all of it is in, it joins
        the batch and its first token is sampled from the prefill. (its event or None while prompt
        is left, tokens prefilled). If its prefill fails (out of memory on a long prompt, say), it
        fails alone: it never joined the batch."""
        used = 0
        try:
            if r.partial is None:
                self.cache.expect(len(r.prompt), r.gen)
                r.partial, r.reused = self._cached_prefix(r.prompt, r.salt)
                r.fed = r.reused
            used = int(min(budget, len(r.prompt) - r.fed))
            r.partial, r.logits = self.cache.prefill(r.prompt[r.fed:r.fed + used], r.partial)
            r.fed += used
        except Exception as e:  # noqa: BLE001 - this request's own work
            r.partial = None
            return self._fail(r, e, time.perf_counter()), used
        if r.fed < len(r.prompt):
            return None, used
        row, r.partial = r.partial, None
        return self._join(r, row), used

    def _join(self, r: _Request, row) -> BatchEvent:
        """A request whose prompt is all in (`row`, its one-row cache) joins the batch as its last
        row; its first token comes from the prefill's logits."""
        self.cache.add(row)
        self.rows.append(r)
        return replace(self._sample(r, time.perf_counter()), cached_tokens=r.reused)

    def _sample(self, r: _Request, now: float) -> BatchEvent:
        try:
            allowed = r.matcher.allowed() if r.matcher else None
            token = sampling.choose(r.logits, r.gen, r.prompt, r.output, allowed, r.rng)
            return self._emit(r, token, now, r.logits)
        except Exception as e:  # noqa: BLE001 - this row's sampling, grammar or logprobs: it fails alone
            return self._fail(r, e, now)

    def _fail(self, r: _Request, error: Exception, now: float) -> BatchEvent:
        r.failed = True
        return BatchEvent(r.uid, None, "error", now, error=error)

    def _emit(self, r: _Request, token: int, now: float, logits: np.ndarray, from_draft: bool = False) -> BatchEvent:
        r.output.append(token)
        if r.matcher is not None:
            r.matcher.advance(token)
        logprobs = None if r.gen.logprobs is None else sampling.logprobs(logits, token, r.gen.logprobs)
        if token in self.eos_ids and not r.gen.ignore_eos:
            reason = "eos"
        elif len(r.output) >= r.gen.max_tokens:
            reason = "max_tokens"
        else:
            reason = None
        return BatchEvent(r.uid, token, reason, now, logprobs=logprobs, from_draft=from_draft)

    def _drop_cancelled(self) -> list[BatchEvent]:
        if not self._cancelled:
            return []
        part = [self.prefilling] if self.prefilling else []
        events = [BatchEvent(r.uid, None, "cancelled", time.perf_counter())
                  for r in itertools.chain(self.waiting, part, self.rows) if r.uid in self._cancelled]
        self.waiting = deque(r for r in self.waiting if r.uid not in self._cancelled)
        if self.prefilling and self.prefilling.uid in self._cancelled:
            self.prefilling = None  # its part-way cache goes with it
        for i, r in enumerate(self.rows):  # what a decoding row computed is worth keeping (a stop string ended it)
            if r.uid in self._cancelled and not r.failed:
                self._remember((r.salt, *r.prompt, *r.output[:-1]), self.cache.extract(i))
        self._keep([i for i, r in enumerate(self.rows) if r.uid not in self._cancelled])
        self._cancelled.clear()
        return events

    def _drop_finished(self, events: list[BatchEvent]) -> None:
        done = {e.uid for e in events if e.finish_reason}
        if not done:
            return
        for i, r in enumerate(self.rows):
            if r.uid in done and not r.failed:  # its cache holds the prompt and every output token but the last
                self._remember((r.salt, *r.prompt, *r.output[:-1]), self.cache.extract(i))
        self._keep([i for i, r in enumerate(self.rows) if r.uid not in done])

    def _keep(self, keep: list[int]) -> None:
        if len(keep) != len(self.rows):
            self.cache.keep(keep)
            self.rows = [self.rows[i] for i in keep]

    def _remember(self, key: tuple, row) -> None:
        if self.prompt_cache_size <= 0:
            return
        self.prompt_cache[key] = row
        self.prompt_cache.move_to_end(key)
        while len(self.prompt_cache) > self.prompt_cache_size:
            self.prompt_cache.popitem(last=False)

    def _cached_prefix_length(self, prompt: list[int], salt: str | None) -> tuple[tuple | None, int]:
        """The prompt-cache key under `salt` sharing the longest prefix with `prompt` (all but its
        last token, which is fed again for the next-token logits), and that length."""
        best, best_n = None, 0
        for key in self.prompt_cache:
            if key[0] != salt:
                continue
            n = common_prefix(key[1:], prompt, len(prompt) - 1)
            if n > best_n:
                best, best_n = key, n
        return best, best_n

    def _cached_prefix(self, prompt: list[int], salt: str | None) -> tuple[object | None, int]:
        """The longest prefix of `prompt` cached under `salt`, as a one-row cache of its own, and its length."""
        best, best_n = self._cached_prefix_length(prompt, salt)
        if best is None:
            return None, 0
        row = self.prompt_cache[best] if self.cache.crop_copies else self.prompt_cache.pop(best)
        if self.cache.crop_copies:
            self.prompt_cache.move_to_end(best)
        return self.cache.crop(row, best_n), best_n


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """How many tokens `a` and `b` share from the start (at most `limit`)."""
    n, limit = 0, min(len(a), len(b), len(a) if limit is None else limit)
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class Output:
    """One request's side of its batch's events: its text (TextStream: detokenizing, EOS,
    max_tokens, stop strings), each token's logprobs entry, and why it finished, decided here for
    every caller (the server, generate_all, Backend.stream)."""

    def __init__(self, tokenizer, eos_ids: frozenset[int], gen: GenerationConfig):
        self.text = TextStream(tokenizer, eos_ids, gen)
        self.tokenizer = tokenizer
        # "eos" | "max_tokens" | "stop" (a stop string) | "cancelled" | "error"; None while it runs
        self.finish_reason: str | None = None
        self.error: Exception | None = None  # with "error": the request's own failure
        self.cached_tokens = 0  # prompt tokens its prefill found in the prompt cache
        self.logprobs: deque = deque()  # each generated token's entry, until its chunk takes it
        self.eos_logprobs: tuple | None = None  # the entry of the EOS that ended it (which makes no chunk)

    def take(self, event: BatchEvent) -> list[Chunk]:
        """The chunks `event` completes. A stop string finishes the text before the batch knows:
        then `finish_reason` is set while the event's is None, and the caller cancels the request."""
        chunks = []
        self.cached_tokens = self.cached_tokens or event.cached_tokens
        if event.token is not None and self.finish_reason is None:
            if event.logprobs is not None:
                self.logprobs.append(logprob_entry(self.tokenizer, event.token, *event.logprobs))
            chunks = self.text.push(event.token, event.time_s, event.from_draft)
            self.finish_reason = self.text.finished
        if event.finish_reason and self.finish_reason is None:
            chunks += self.text.close()  # held back for a stop string that did not come
            self.finish_reason = self.text.finished or event.finish_reason
            self.error = event.error
        # chunks come one per token in order (EOS makes none), so the oldest entry is the chunk's
        chunks = [replace(c, logprobs=self.logprobs.popleft()) if self.logprobs else c for c in chunks]
        if self.finish_reason == "eos" and self.logprobs:  # vLLM lists it; lm-eval reads its place
            self.eos_logprobs = self.logprobs.popleft()
        return chunks


def logprob_entry(tokenizer, token: int, logprob: float, top: tuple) -> tuple:
    """Chunk.logprobs: (text, log-probability, top alternatives as (text, log-probability)), the
    token ids of sampling.logprobs decoded (by the thread that owns the tokenizer)."""
    decode = tokenizer.decode
    return decode([token]), logprob, tuple((decode([t]), lp) for t, lp in top)


def stream_one(batch: BatchGenerator, prompt_ids: Sequence[int], gen: GenerationConfig, tokenizer,
               eos_ids: frozenset[int], admitted: Callable[[int], None] | None = None) -> Iterator[Chunk]:
    """One request through `batch`, which holds nothing else (Backend.stream's batch of one), its
    Chunks as they are made: until EOS (not yielded unless gen.ignore_eos), gen.max_tokens or a
    stop string. `admitted(cached prompt tokens)` is called once its prompt is in. Closing the
    iterator early cancels the request (its cache row is kept in the batch's prompt cache)."""
    out = Output(tokenizer, eos_ids, gen)
    uid = batch.add(prompt_ids, gen)
    try:
        while out.finish_reason is None:
            for event in batch.step():
                chunks = out.take(event)
                if admitted is not None and event.token is not None:
                    admitted(out.cached_tokens)
                    admitted = None
                if out.finish_reason == "error":
                    raise out.error
                yield from chunks
    finally:
        if batch.busy:  # left early (a stop string, or the reader stopped): the request leaves
            batch.cancel(uid)
            batch.step()


class PromptCache:
    """A conversation kept between prompts (billion chat): its batch of one, whose prompt cache
    holds the last reply's KV cache, so a new prompt computes only the tokens that differ from the
    last prompt and reply. A prefix's KV cache is exactly that prefix's, so reuse is always
    correct: an edited history or a new system message keeps only what is still shared (nothing
    when the first token differs). `reset()` forgets everything (/clear). Not thread-safe: one
    generation at a time."""

    def __init__(self, backend):
        self.backend = backend
        self.batch: BatchGenerator | None = None
        self.key: tuple = ()  # the draft the batch was built with
        self.reused = 0  # prompt tokens the last prompt found in the cache

    def reset(self) -> None:
        self.batch, self.reused = None, 0

    def stream(self, prompt_ids: Sequence[int], gen: GenerationConfig, *, draft=None, num_draft: int = 4,
               stats=None) -> Iterator[Chunk]:
        if self.batch is None or self.key != (draft, num_draft):
            self.batch = self.backend.batch(max_batch=1, prompt_cache_size=1, draft=draft, num_draft=num_draft)
            self.key = (draft, num_draft)
        if stats is not None:
            self.batch.stats = stats
        self.reused = 0
        try:
            yield from stream_one(self.batch, prompt_ids, gen, self.backend.tokenizer, self.backend.eos_ids,
                                  admitted=lambda cached: setattr(self, "reused", cached))
        except BaseException as e:
            # a step that failed or was interrupted (Ctrl-C) leaves the cache in an unknown state;
            # closing the iterator (GeneratorExit) leaves it consistent
            if not isinstance(e, GeneratorExit):
                self.reset()
            raise


@dataclass
class Generated:
    """One prompt's generation by generate_all."""

    tokens: list[int]  # every token made (the EOS token not included)
    text: str
    finish_reason: str | None  # "eos", "max_tokens", "stop" (gen.stop), "stopped" (stop_when)


def generate_all(backend, prompts: Sequence[Sequence[int]], gens: Sequence[GenerationConfig], *,
                 max_batch: int = 8, stop_when: Callable[[int, str], bool] | None = None) -> list[Generated]:
    """Every prompt generated, up to `max_batch` decoded together (one at a time on an engine
    without a batched KV cache), in the order given. `stop_when(i, text so far)` ends the i-th
    generation early (a caller's own rule, e.g. HumanEval's stop sequences); gen.stop, EOS and
    gen.max_tokens end it as Backend.stream does."""
    batch = backend.batch(max_batch=max_batch, prompt_cache_size=0)
    uids = [batch.add(p, g) for p, g in zip(prompts, gens)]
    index = {uid: i for i, uid in enumerate(uids)}
    outs = {uid: Output(backend.tokenizer, backend.eos_ids, g) for uid, g in zip(uids, gens)}
    got = {uid: Generated([], "", None) for uid in uids}
    while batch.busy:
        for e in batch.step():
            out, g = outs[e.uid], got[e.uid]
            if g.finish_reason is not None:
                continue
            for chunk in out.take(e):
                g.tokens.append(chunk.token)
                g.text += chunk.text
            if out.finish_reason == "error":
                raise out.error
            g.finish_reason = out.finish_reason
            if g.finish_reason is None and stop_when and stop_when(index[e.uid], g.text):
                g.finish_reason = "stopped"
            if g.finish_reason and not e.finish_reason:
                batch.cancel(e.uid)
    return [got[uid] for uid in uids]
