"""The server's Prometheus metrics (`GET /metrics`), as llama.cpp's server and vLLM expose them:
requests by route and status, tokens generated, the generation rate over the last 10 seconds,
the engine's queue, active rows and KV blocks, and histograms of time to first token and of
request duration. One registry per server (several servers may live in one process)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW = 10.0  # seconds the tokens/s gauge averages over


class Metrics:
    def __init__(self, server) -> None:
        engine = server.engine
        self.registry = r = CollectorRegistry()
        self.requests = Counter("emergence_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("emergence_prompt_tokens", "prompt tokens of the requests answered",
                                     registry=r)
        self.ttft = Histogram("emergence_time_to_first_token_seconds", "from a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("emergence_request_duration_seconds", "from a request's arrival to its last byte",
                                  buckets=LATENCY_BUCKETS, registry=r)
        Gauge("emergence_tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW:g} s",
              registry=r).set_function(self._rate)
        Gauge("emergence_queue_depth", "requests waiting for a slot", registry=r).set_function(lambda: engine.waiting)
        Gauge("emergence_active_requests", "rows being decoded", registry=r).set_function(lambda: engine.active)
        Gauge("emergence_kv_blocks_used", "KV cache blocks held by sequences", registry=r).set_function(
            lambda: engine.cache.num_used)
        Gauge("emergence_kv_blocks_total", "KV cache blocks in the pool", registry=r).set_function(
            lambda: engine.cache.num_blocks)
        Gauge("emergence_kv_blocks_cached", "KV cache blocks holding a cached prefix (held or not)",
              registry=r).set_function(lambda: engine.cache.num_cached)
        Gauge("emergence_kv_block_tokens", "tokens per KV cache block", registry=r).set_function(
            lambda: engine.cache.block_size)
        r.register(_EngineCounters(engine))
        self._engine = engine
        self._samples: deque[tuple[float, int]] = deque()  # (time, tokens generated so far)

    def observe(self, state) -> None:
        """One answered request (serve.app.RequestState)."""
        self.requests.labels(state.path, str(state.status)).inc()
        self._rate()  # a sample of the generation rate
        if state.prompt_tokens:
            self.prompt_tokens.inc(state.prompt_tokens)
        if state.first_token is not None:
            self.ttft.observe(state.first_token)
        self.duration.observe(time.perf_counter() - state.start)

    def _rate(self) -> float:
        now, total = time.monotonic(), self._engine.generated
        self._samples.append((now, total))
        while len(self._samples) > 1 and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCounters:
    """The engine's own counters, read at each scrape."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily("emergence_generated_tokens", "tokens generated", value=self.engine.generated)
        yield CounterMetricFamily("emergence_preemptions", "rows preempted for lack of KV blocks",
                                  value=self.engine.preemptions)
        yield CounterMetricFamily("emergence_prefill_prompt_tokens", "prompt tokens admitted to the decode batch",
                                  value=self.engine.prompt_tokens)
        yield CounterMetricFamily("emergence_prefix_cache_hit_tokens",
                                  "prompt tokens taken from the prefix cache instead of computed",
                                  value=self.engine.cached_tokens)
