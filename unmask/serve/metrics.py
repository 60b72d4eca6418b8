"""The server's Prometheus metrics (`/metrics`), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("unmask_queue_depth", "requests waiting for a batch", registry=r)
        self.rows = Gauge("unmask_running_rows", "rows in the batch being decoded", registry=r)
        self.in_flight = Gauge(
            "unmask_requests_in_flight", "requests accepted and not yet answered", registry=r
        )
        self.requests = Counter("unmask_requests", "requests by HTTP status", ["status"], registry=r)
        self.tokens = Counter("unmask_completion_tokens", "tokens generated", registry=r)
        self.nfe = Counter("unmask_nfe", "model forward calls (NFE)", registry=r)
        self.tokens_per_s = Gauge("unmask_tokens_per_second", "tokens/s of the last batch", registry=r)
        self.nfe_per_s = Gauge("unmask_nfe_per_second", "NFE/s of the last batch", registry=r)
        self.latency = Histogram("unmask_request_seconds", "request latency", registry=r)

    def on_batch(self, tokens: int, nfe: int, seconds: float, rows: int) -> None:
        self.tokens.inc(tokens)
        self.nfe.inc(nfe)
        self.tokens_per_s.set(tokens / max(seconds, 1e-9))
        self.nfe_per_s.set(nfe / max(seconds, 1e-9))
