"""Load benchmark of running OpenAI-compatible servers (`billion load`): billion serve, llama-server,
mlx_lm.server, vLLM, anything that streams /v1/completions or /v1/chat/completions.

What a point is: one server, one load level (a concurrency, or a Poisson request rate), a fixed
number of requests, an overall timeout. Every figure is computed from client-side timestamps
(`time.perf_counter()`, taken when a line of the stream has been read):

- sent: just before the request is handed to the HTTP client;
- TTFT: from sent to the first *content event* (an event whose text is not empty: a chat stream's
  role-only first chunk is not content);
- ITL: the gaps between successive content events of one stream, pooled over the point's successful
  requests. A chunk that carries several tokens is one event, so its gap is counted once and not
  divided among its tokens (vLLM's `vllm bench serve` does the same): ITL is how long a reader
  waits between text updates. `tokens_per_event` says how many tokens an event carried on average;
- TPOT, per request: (E2E - TTFT) / (output tokens - 1), 0 for a single token (vLLM's definition):
  the per-token figure whatever the chunking;
- E2E: from sent to the end of the stream (`[DONE]` or the connection closing);
- output tokens: the usage chunk's `completion_tokens` (asked for with
  `stream_options.include_usage`) when the server sends one, else the number of content events;
- wall time: from the point's start to its last request's end (or to its timeout); output tok/s
  and requests/s divide by it; goodput is vLLM's `--goodput`: successful requests meeting every
  given SLO (each metric <= its limit: ttft, tpot, e2el), per second of wall time.

Only loopback servers are accepted: this tool sends as many requests as it is told to.
Knows nothing of click or records: the command (billion/commands/load.py) writes them.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

try:
    import httpx
except ImportError:  # openai 3 depends on httpx's successor, httpx2 (the same API)
    import httpx2 as httpx
import numpy as np

from backends.types import UserError
from billion.net import is_loopback

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
SLO_KEYS = ("ttft", "tpot", "e2el")  # vLLM's --goodput keys (seconds here, milliseconds there)
PERCENTILES = (50, 90, 99)


@dataclass
class ServeBenchConfig:
    """What every point of a run shares (the record's config, with the point and the server)."""

    endpoint: str = "completions"
    prompt_len: str = "128"  # words: N or LOW-HIGH (uniform)
    output_len: str | None = None  # max_tokens: N or LOW-HIGH; None: 64, or the dataset's lengths
    dataset: str | None = None  # ShareGPT-style JSON
    requests: int | None = None  # per point; None: Point.default_requests
    timeout_s: float = 600.0  # per point
    seed: int = 0
    slo: dict = field(default_factory=dict)  # {"ttft": s, "tpot": s, "e2el": s}


# ---------------------------------------------------------------- parsing what the user typed

@dataclass(frozen=True)
class Target:
    """One server to load: its base URL (no /v1), the model id asked for (URL#MODEL) and the name
    tables, records and charts give it (NAME=URL); None where they are found out (`Server`)."""

    url: str
    model: str | None = None
    name: str | None = None


def check_loopback(url: str) -> None:
    """UserError unless `url` is http(s) to a loopback host: a load test aimed elsewhere is a
    denial of service on someone else's machine."""
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{url!r} is not an http:// URL (e.g. http://127.0.0.1:8080)")
    if not is_loopback(parts.hostname):
        raise UserError(f"refusing to load-test {parts.hostname!r}: only loopback servers "
                        "(127.0.0.1, ::1, localhost)")


def parse_target(text: str) -> Target:
    """`[NAME=]URL[#MODEL]`: a loopback base URL (a trailing /v1 is dropped: the routes add it)."""
    name, target = None, text.strip()
    head, eq, rest = target.partition("=")
    if eq and "/" not in head and ":" not in head:  # NAME=URL (a URL's own '=' comes after its host)
        name, target = head.strip(), rest.strip()
        if not name:
            raise UserError(f"{text.strip()!r}: an empty name before '='")
    url, _, model = target.partition("#")
    check_loopback(url)
    url = url.rstrip("/").removesuffix("/v1")
    return Target(url, model.strip() or None, name)


def parse_targets(texts) -> list[Target]:
    """Every target of the command line: each argument one target or a comma list of them."""
    targets = [parse_target(t) for text in texts for t in text.split(",") if t.strip()]
    if not targets:
        raise UserError("no server given: billion load http://127.0.0.1:8080")
    return targets


@dataclass(frozen=True)
class Length:
    """A length drawn per request: fixed (low == high) or uniform over [low, high]."""

    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


def parse_length(text: str, option: str) -> Length:
    """`N` or `LOW-HIGH` (integers >= 1)."""
    low, dash, high = str(text).strip().partition("-")
    try:
        length = Length(int(low), int(high) if dash else int(low))
    except ValueError:
        raise UserError(f"{option}: expected N or LOW-HIGH (e.g. 128 or 64-256), got {text!r}") from None
    if length.low < 1 or length.high < length.low:
        raise UserError(f"{option}: lengths are at least 1 and LOW <= HIGH, got {text!r}")
    return length


def parse_list(text: str, option: str, kind=int) -> tuple:
    """A comma list of positive numbers (`1,2,4`; rates may be fractions: `0.5,1,2`)."""
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{option}: expected a comma list of numbers, got {text!r}") from None
    if not values or not all(v > 0 for v in values):  # (a NaN is not above 0 either)
        raise UserError(f"{option}: expected a comma list of numbers above 0, got {text!r}")
    return values


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft=0.5,tpot=0.05,e2el=10` (seconds) -> {"ttft": 0.5, ...}; the keys are vLLM's."""
    if not text:
        return {}
    slo = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        key = key.strip().lower()
        if not eq or key not in SLO_KEYS:
            raise UserError(f"--slo: expected KEY=SECONDS pairs with KEY one of {', '.join(SLO_KEYS)} "
                            f"(e.g. ttft=0.5,tpot=0.05,e2el=10), got {part.strip()!r}")
        try:
            slo[key] = float(value)
        except ValueError:
            raise UserError(f"--slo: {key}={value!r} is not a number of seconds") from None
        if not slo[key] > 0:
            raise UserError(f"--slo: {key} must be above 0 seconds, got {value}")
    return slo


# ---------------------------------------------------------------- the workload

@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int


# Syllables of made-up words: most tokenizers split such a word into one to three pieces, and a
# prompt of them shares no prefix with another prompt (no prompt cache hit between requests).
_ONSETS = ("b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "ch", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


def random_words(rng: random.Random, count: int) -> str:
    """`count` made-up lowercase words of one to three syllables, separated by spaces."""
    return " ".join("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3)))
                    for _ in range(count))


def synthetic_requests(count: int, prompt_len: Length, output_len: Length, seed) -> list[Request]:
    """`count` requests: prompts of `prompt_len` random words, `output_len` tokens asked for each."""
    rng = random.Random(seed)
    return [Request(random_words(rng, prompt_len.draw(rng)), output_len.draw(rng)) for _ in range(count)]


def load_sharegpt(path: str | Path) -> list[tuple[str, int]]:
    """(prompt, output length) of every usable conversation of a ShareGPT-style JSON file: a list of
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}.

    The prompt is the first human turn; the output length is the number of whitespace-separated
    words of the gpt turn that answers it (words, not tokens: no tokenizer is loaded; a word is one
    or more tokens, so these lengths are at most the answer's token count). A conversation without
    a human turn answered by a gpt turn is skipped; an entry of the wrong shape is an error naming
    the file and the entry's index."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{\"conversations\": [...]}} entries")
    pairs = []
    for i, entry in enumerate(data):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
                for t in turns):
            raise UserError(f"{path}: entry {i}: expected {{\"conversations\": [{{\"from\": ..., \"value\": "
                            f"...}}, ...]}} with string \"from\" and \"value\" in every turn")
        for first, second in zip(turns, turns[1:]):
            if first["from"] == "human" and second["from"] == "gpt":
                if first["value"].strip() and second["value"].split():
                    pairs.append((first["value"], len(second["value"].split())))
                break
    if not pairs:
        raise UserError(f"{path}: no conversation has a human turn answered by a gpt turn")
    return pairs


def dataset_requests(pairs: list[tuple[str, int]], count: int, seed, output_len: Length | None = None
                     ) -> list[Request]:
    """`count` requests drawn from the dataset's (prompt, output length) pairs: a seeded shuffle,
    cycled when the file has fewer; `output_len` replaces the dataset's lengths when given."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    chosen = [pairs[order[i % len(order)]] for i in range(count)]
    return [Request(prompt, output_len.draw(rng) if output_len else words) for prompt, words in chosen]


def poisson_offsets(count: int, rate: float, seed) -> list[float]:
    """Send times (seconds from the point's start) of `count` requests arriving as a Poisson process
    of `rate` requests/s: the first at 0, then gaps drawn from an exponential distribution of mean
    1/rate (seeded: the same seed gives the same arrivals, scaled by 1/rate across rates)."""
    rng = random.Random(seed)
    offsets = [0.0]
    for _ in range(count - 1):
        offsets.append(offsets[-1] + rng.expovariate(rate))
    return offsets


@dataclass(frozen=True)
class Point:
    """One load level: `concurrency` requests kept in flight (closed loop), or Poisson arrivals at
    `rate` requests/s whatever the answers (open loop)."""

    concurrency: int | None = None
    rate: float | None = None

    def __str__(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency else f"{self.rate:g} req/s"

    def default_requests(self) -> int:
        """4 per concurrent request (at least 16), so most of a point runs at its concurrency rather
        than filling and draining; 32 at a rate."""
        return max(16, 4 * self.concurrency) if self.concurrency else 32

    def record(self) -> dict:
        return {"concurrency": self.concurrency} if self.concurrency else {"request_rate": self.rate}


# ---------------------------------------------------------------- one request

@dataclass
class Outcome:
    """One request as the client saw it (perf_counter seconds)."""

    asked: int  # max_tokens
    sent: float | None = None
    events: list[float] = field(default_factory=list)  # each content event's arrival
    end: float | None = None
    usage_tokens: int | None = None  # completion_tokens of the usage chunk
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Answered 200, streamed to its end without an error event, with some content."""
        return self.error is None and self.end is not None and bool(self.events)

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.events)

    @property
    def ttft(self) -> float:
        return self.events[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.end - self.sent

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.events, self.events[1:])]

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else 0.0


def request_body(endpoint: str, model: str, request: Request) -> dict:
    """A streamed request for exactly `max_tokens` tokens: EOS ignored (`ignore_eos`, vLLM's name,
    which billion serve and llama-server know; other servers drop unknown fields), greedy so every
    server does comparable work, and a usage chunk at the end for the exact token count."""
    body = {"model": model, "max_tokens": request.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


def event_text(event: dict) -> str:
    """The text an event carries: completions' `text`, chat's `delta.content` (or a reasoning
    model's `delta.reasoning_content`), over its choices."""
    out = []
    for choice in event.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        text = choice.get("text") or delta.get("content") or delta.get("reasoning_content")
        out.append(text if isinstance(text, str) else "")
    return "".join(out)


async def send(client, endpoint: str, model: str, request: Request) -> Outcome:
    """Send one streamed request and time it (see the module's docstring for what each time means)."""
    out = Outcome(request.max_tokens)
    body = request_body(endpoint, model, request)
    out.sent = time.perf_counter()
    try:
        async with client.stream("POST", ENDPOINTS[endpoint], json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return out
            async for line in r.aiter_lines():
                now = time.perf_counter()  # before parsing: the time the line was read
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if not isinstance(event, dict):
                    continue
                if event.get("error"):
                    error = event["error"]
                    out.error = str(error.get("message", error) if isinstance(error, dict) else error)[:200]
                    return out
                if event_text(event):
                    out.events.append(now)
                usage = event.get("usage")
                if isinstance(usage, dict):
                    out.usage_tokens = usage.get("completion_tokens", out.usage_tokens)
                    out.prompt_tokens = usage.get("prompt_tokens", out.prompt_tokens)
        out.end = time.perf_counter()
    except (httpx.HTTPError, ValueError) as e:  # ValueError: a line that is not JSON
        out.error = f"{type(e).__name__}: {e}"[:200]
    return out


# ---------------------------------------------------------------- a server

@dataclass(frozen=True)
class Server:
    """A target once its model is known: what records and tables call it."""

    url: str
    model_id: str  # the id requests carry, as the server serves it
    name: str  # the record's backend: NAME, else the engine of a billion id, else owned_by, else host:port
    model: str  # the record's model: a billion id without its @engine, else the id
    owner: str | None = None  # /v1/models' owned_by ("billion" for billion serve)

    @property
    def billion(self) -> bool:
        """Served by billion serve: its model id is one of billion's specs."""
        return self.owner == "billion" or split_engine(self.model_id)[1] is not None


def split_engine(model_id: str) -> tuple[str, str | None]:
    """billion serve's `spec@engine` -> (spec, engine); any other id -> (id, None)."""
    from backends import ENGINES

    spec, at, engine = model_id.rpartition("@")
    return (spec, engine) if at and spec and engine in ENGINES else (model_id, None)


async def served_models(client, url: str) -> list[dict]:
    """GET /v1/models' entries; a server that is not there is a one-line error."""
    try:
        r = await client.get("/v1/models")
    except httpx.HTTPError as e:
        raise UserError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        return []  # some servers lack the route; a model named with URL#MODEL still works
    try:
        data = r.json().get("data")
    except (ValueError, AttributeError):
        return []
    return [m for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]


def choose_model(target: Target, listed: list[dict]) -> str:
    """URL#MODEL as given (some servers answer names they do not list), else the one model listed."""
    if target.model:
        return target.model
    ids = [m["id"] for m in listed]
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise UserError(f"{target.url} lists no model (GET /v1/models): name one as {target.url}#MODEL")
    raise UserError(f"{target.url} serves {len(ids)} models ({', '.join(ids)}): pick one as "
                    f"{target.url}#MODEL, or several as separate targets")


def server_of(target: Target, model_id: str, listed: list[dict]) -> Server:
    model, engine = split_engine(model_id)
    owner = next((m.get("owned_by") for m in listed if m["id"] == model_id), None)
    owner = owner if isinstance(owner, str) and owner else None
    name = target.name or engine or owner or urlparse(target.url).netloc
    return Server(target.url, model_id, name, model, owner)


def client_for(url: str, timeout_s: float):
    # No connection limit: the point's concurrency (or arrival rate) alone decides what is in flight,
    # never a wait for the client's pool, which would count in TTFT.
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def connect(targets: list[Target], endpoint: str, probe: Request, timeout_s: float) -> list[Server]:
    """Each target's model, name, and one untimed request (`probe`, also a warm-up): a wrong model,
    endpoint or URL fails here, before any point, as a one-line error."""
    servers = []
    for target in targets:
        async with client_for(target.url, timeout_s) as client:
            listed = await served_models(client, target.url)
            server = server_of(target, choose_model(target, listed), listed)
            out = await send(client, endpoint, server.model_id, probe)
        if not out.ok:
            raise UserError(f"{target.url}: a first {ENDPOINTS[endpoint]} request for {server.model_id!r} failed: "
                            f"{out.error or 'no text in the stream'}")
        servers.append(server)
    names = [s.name for s in servers]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"two servers are both called {name!r}: name them, e.g. a=URL b=URL")
    return servers


# ---------------------------------------------------------------- a point

@dataclass
class PointRun:
    outcomes: list[Outcome]
    start: float  # perf_counter
    wall_s: float


async def run_point(client, endpoint: str, model_id: str, requests: list[Request], point: Point,
                    timeout_s: float, seed=0) -> PointRun:
    """Send `requests` at `point`'s load and wait for them all, or for `timeout_s`: what has not
    finished by then is cancelled and fails ("not finished within the timeout")."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    tasks: list[asyncio.Task] = []

    async def one(i: int) -> None:
        outcomes[i] = await send(client, endpoint, model_id, requests[i])

    async def closed_loop() -> None:
        pending = iter(range(len(requests)))  # shared: each worker takes the next request when free

        async def worker() -> None:
            for i in pending:
                await one(i)

        tasks.extend(asyncio.ensure_future(worker()) for _ in range(min(point.concurrency, len(requests))))
        await asyncio.gather(*tasks)

    async def open_loop() -> None:
        for i, at in enumerate(poisson_offsets(len(requests), point.rate, seed)):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)

    start = time.perf_counter()
    try:
        await asyncio.wait_for(closed_loop() if point.concurrency else open_loop(), timeout_s)
    except asyncio.TimeoutError:
        pass
    finally:  # on a timeout (or Ctrl-C) nothing keeps running after the point
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - start
    done = [o or Outcome(r.max_tokens, error=f"not finished within the point's timeout ({timeout_s:g} s)")
            for o, r in zip(outcomes, requests)]
    return PointRun(done, start, wall)


def distribution(values: list[float], name: str) -> dict:
    """{name_mean_s, name_p50_s, name_p90_s, name_p99_s} (numpy's linear percentiles, as vLLM);
    None each when there are no values."""
    out = {f"{name}_mean_s": float(np.mean(values)) if values else None}
    ps = np.percentile(values, PERCENTILES) if values else [None] * len(PERCENTILES)
    out.update({f"{name}_p{p}_s": (float(v) if v is not None else None) for p, v in zip(PERCENTILES, ps)})
    return out


def meets_slo(outcome: Outcome, slo: dict[str, float]) -> bool:
    """Every given limit holds (<=) for this successful request: vLLM's good request."""
    measured = {"ttft": outcome.ttft, "tpot": outcome.tpot, "e2el": outcome.e2e}
    return all(measured[key] <= limit for key, limit in slo.items())


def summarise(run: PointRun, slo: dict[str, float] | None = None) -> dict:
    """The point's metrics from its outcomes (units in the names; see the module docstring)."""
    ok = [o for o in run.outcomes if o.ok]
    tokens = sum(o.tokens for o in ok)
    events = sum(len(o.events) for o in ok)
    sent = sorted(o.sent - run.start for o in run.outcomes if o.sent is not None)
    prompt = [o.prompt_tokens for o in ok if o.prompt_tokens is not None]
    metrics = {
        "requests": len(run.outcomes), "requests_ok": len(ok), "requests_failed": len(run.outcomes) - len(ok),
        # with ignore_eos every answer should hold what it asked for; a server that ignores the
        # field may stop at EOS: counted, not failed
        "requests_short": sum(o.tokens < o.asked for o in ok),
        "errors": list(dict.fromkeys(o.error for o in run.outcomes if o.error))[:5],
        "wall_s": run.wall_s,
        "output_tokens": tokens, "output_tokens_asked": sum(o.asked for o in ok),
        "tokens_from_usage": sum(o.usage_tokens is not None for o in ok),
        "tokens_per_event": tokens / events if events else None,
        "prompt_tokens_mean": float(np.mean(prompt)) if prompt else None,
        "output_tps": tokens / run.wall_s if run.wall_s > 0 else None,
        "requests_per_s": len(ok) / run.wall_s if run.wall_s > 0 else None,
        # the rate requests actually left at: what a Poisson point's schedule achieved
        "send_rate_rps": (len(sent) - 1) / sent[-1] if len(sent) > 1 and sent[-1] > 0 else None,
    }
    metrics.update(distribution([o.ttft for o in ok], "ttft"))
    metrics.update(distribution([gap for o in ok for gap in o.itls], "itl"))
    metrics.update(distribution([o.tpot for o in ok], "tpot"))
    metrics.update(distribution([o.e2e for o in ok], "e2e"))
    if slo:
        good = sum(meets_slo(o, slo) for o in ok)
        metrics.update({"requests_good": good, "goodput_rps": good / run.wall_s if run.wall_s > 0 else None})
    return metrics


def per_request(run: PointRun) -> list[dict]:
    """Each request's own figures, for the record (re-analysis without re-running)."""
    return [{"sent_s": o.sent - run.start if o.sent is not None else None,
             "ttft_s": o.ttft if o.ok else None, "e2e_s": o.e2e if o.ok else None,
             "output_tokens": o.tokens if o.ok else None, "asked": o.asked, "events": len(o.events),
             "prompt_tokens": o.prompt_tokens, "error": o.error} for o in run.outcomes]


# ---------------------------------------------------------------- the sweep

def workload(cfg: ServeBenchConfig) -> Callable[[int, int], list[Request]]:
    """(point index, count) -> that point's requests. Each point draws its own prompts (seeded by
    seed and point), so a server's prompt cache never meets a prompt of an earlier point; every
    server gets the same requests at the same point."""
    output_len = parse_length(cfg.output_len, "--output-len") if cfg.output_len else None
    if cfg.dataset:
        pairs = load_sharegpt(cfg.dataset)
        return lambda i, n: dataset_requests(pairs, n, f"{cfg.seed}:{i}", output_len)
    prompt_len = parse_length(cfg.prompt_len, "--prompt-len")
    return lambda i, n: synthetic_requests(n, prompt_len, output_len or Length(64, 64), f"{cfg.seed}:{i}")


def describe(cfg: ServeBenchConfig) -> str:
    """The workload in words: what a chart compares servers under (records with equal text share one)."""
    if cfg.dataset:
        out = f"output {cfg.output_len} tokens" if cfg.output_len else "its answers' word counts as max_tokens"
        return f"{cfg.endpoint}, {Path(cfg.dataset).name} prompts, {out}"
    return f"{cfg.endpoint}, prompts of {cfg.prompt_len} random words, {cfg.output_len or 64} tokens out"


async def sweep(targets: list[Target], points: list[Point], cfg: ServeBenchConfig,
                make: Callable[[int, int], list[Request]],
                on_point: Callable[[Server, Point, PointRun, float], None],
                on_connect: Callable[[list[Server]], None] | None = None) -> None:
    """Every point, each server in turn at that point (interleaved, so a drift of the machine over
    the sweep spreads over all servers); `make` is `workload(cfg)`; `on_point(server, point, run,
    started_epoch)` after each."""
    probe = Request(make(-1, 1)[0].prompt, 2)
    servers = await connect(targets, cfg.endpoint, probe, cfg.timeout_s)
    if on_connect:
        on_connect(servers)
    clients = {s.url: client_for(s.url, cfg.timeout_s) for s in servers}
    try:
        for i, point in enumerate(points):
            requests = make(i, cfg.requests or point.default_requests())
            for server in servers:
                started = time.time()
                run = await run_point(clients[server.url], cfg.endpoint, server.model_id, requests, point,
                                      cfg.timeout_s, cfg.seed)
                on_point(server, point, run, started)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients.values()))


def served_source(model_id: str) -> dict | None:
    """Where a billion-served model's weights came from, for the record (ResolvedModel.source): the
    id's spec (before "@<engine>") resolved when its folder is local -- a GGUF file's conversion,
    random or tiny weights, a folder, all already built by the server on this machine --; None for a
    Hub id (no network for a record) or an id that is not a spec."""
    from billion.loading import ResolvedModel, model_folder
    from billion.models import parse_spec

    try:
        spec = parse_spec(split_engine(model_id)[0])
        if spec.kind not in ("gguf", "random", "tiny", "folder"):
            return None
        return ResolvedModel(spec, model_folder(spec, progress=False)).source
    except (UserError, OSError, ValueError):
        return None

