"""Prometheus metrics: engine gauges and counters read at scrape time, latency histograms observed
by the serving layer. Names follow vLLM's, under the `dsv32:` prefix."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0, 20.0, 80.0)

_GAUGES = {
    "num_requests_running": "Sequences being generated (prefilling or decoding).",
    "num_requests_waiting": "Sequences waiting for a slot in the batch.",
    "kv_cache_usage_perc": "Fraction of KV-cache blocks held by live sequences (0..1).",
}
_COUNTERS = {
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits": "Prompt tokens served from the prefix cache.",
    "prompt_tokens": "Prompt tokens admitted.",
    "generation_tokens": "Tokens generated.",
    "num_preemptions": "Sequences preempted for lack of cache blocks.",
    "spec_draft_tokens": "MTP draft tokens verified.",
    "spec_accepted_tokens": "MTP draft tokens accepted (each saves one decode step).",
}


class _EngineCollector:
    """Reads the engine's metrics() dict when /metrics is scraped."""

    def __init__(self, source: Callable[[], dict | None]):
        self.source = source

    def collect(self):
        stats = self.source() or {}
        for name, doc in _GAUGES.items():
            yield GaugeMetricFamily(f"dsv32:{name}", doc, value=float(stats.get(name, 0)))
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"dsv32:{name}", doc, value=float(stats.get(name, 0)))


class Metrics:
    """Per-app registry: histograms, request counters, engine gauges; `render()` gives the text."""

    def __init__(self, engine_stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_stats))
        r = self.registry
        self.ttft = Histogram("dsv32:time_to_first_token_seconds", "Time to the first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dsv32:inter_token_latency_seconds", "Time between streamed tokens.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("dsv32:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram("dsv32:request_prompt_tokens", "Prompt length of finished requests.",
                                    buckets=(1, 8, 32, 128, 512, 2048, 8192, 32768, 131072), registry=r)
        self.success = Counter("dsv32:request_success", "Finished requests by finish reason.",
                               ["finished_reason"], registry=r)
        self.http = Counter("dsv32:http_requests", "HTTP requests by route and status.",
                            ["path", "status"], registry=r)
        self.rejected = Counter("dsv32:requests_rejected", "Requests refused because the queue was full.",
                                registry=r)
        self.rate_limited = Counter("dsv32:requests_rate_limited", "Requests refused by a limit of their API key.",
                                    ["key", "limit"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
