"""`/metrics`: the server's counters in Prometheus' text format, with the `prometheus_client` library,
for the scrapers that llama-server, vLLM and SGLang feed.

- `billion_requests_total{route, status}`: answers, counted as their status line is sent (paths
  that are not the app's routes are counted as "other", so a scanner cannot grow the label set);
- `billion_prompt_tokens_total`, `billion_generation_tokens_total` and
  `billion_prompt_cache_hit_tokens_total`, per model id, counted as each generation ends;
- `billion_time_to_first_token_seconds` (request arrival to first token) and
  `billion_inter_token_latency_seconds` (between a request's tokens as the server hands them on)
  histograms, per model id;
- `billion_queue_depth`, `billion_running_requests` and `billion_prompt_cache_rows` gauges, per model
  id, read from each engine's last batch step when scraped.

One registry per app (not the library's global one), so several apps in one process count apart.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, engines: dict, paths=(), mounts=()):
        """engines: {model id: Engine}, read for the gauges at each scrape; paths: the app's routes
        and mounts: its mounted folders, the route labels (any other path is "other")."""
        self.paths, self.mounts = set(paths), tuple(mounts)
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("billion_requests", "HTTP answers by route and status", ["route", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("billion_prompt_tokens", "Prompt tokens of generations that ended", ["model"],
                                     registry=registry)
        self.generation_tokens = Counter("billion_generation_tokens", "Tokens generated", ["model"], registry=registry)
        self.cached_tokens = Counter("billion_prompt_cache_hit_tokens", "Prompt tokens taken from the prompt cache",
                                     ["model"], registry=registry)
        self.ttft = Histogram("billion_time_to_first_token_seconds", "Request arrival to its first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("billion_inter_token_latency_seconds", "Time between a request's tokens",
                             ["model"], buckets=ITL_BUCKETS, registry=registry)
        registry.register(_EngineGauges(engines))

    def answered(self, path: str, status: int) -> None:
        self.requests.labels(self.route_label(path), str(status)).inc()

    def route_label(self, path: str) -> str:
        if path in self.paths:
            return path
        return next((mount for mount in self.mounts if path.startswith(mount + "/")), "other")

    def ended(self, model: str, prompt_tokens: int, generated: int, cached: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(generated)
        self.cached_tokens.labels(model).inc(cached)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges:
    """What each engine holds, as of its last batch step (Engine.stats), at scrape time."""

    def __init__(self, engines: dict):
        self.engines = engines

    def collect(self):
        gauges = {"queued": GaugeMetricFamily("billion_queue_depth", "Requests waiting for a slot", labels=["model"]),
                  "running": GaugeMetricFamily("billion_running_requests", "Requests in the batch (prefilling or "
                                               "decoding)", labels=["model"]),
                  "prompt_cache": GaugeMetricFamily("billion_prompt_cache_rows", "KV rows kept by the prompt cache",
                                                    labels=["model"])}
        for model, engine in self.engines.items():
            held = engine.stats["held"]
            for key, gauge in gauges.items():
                gauge.add_metric([model], held[key])
        yield from gauges.values()
