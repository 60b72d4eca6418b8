"""The server's Prometheus metrics (`/metrics`), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# latency buckets from 50 ms to 10 minutes (a long generation on a CPU takes minutes)
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf"))
POSITIONS = tuple(float(4**i) for i in range(1, 10)) + (float("inf"),)


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
        self.latency = Histogram("unmask_request_seconds", "request latency", buckets=SECONDS, registry=r)
        self.queued = Histogram(
            "unmask_queue_seconds",
            "time a request waited before its batch started",
            buckets=SECONDS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "unmask_batch_seconds", "time a batch spent decoding", buckets=SECONDS, registry=r
        )
        self.rows_per_forward = Histogram(
            "unmask_rows_per_forward", "rows each shared forward pass served", buckets=ROWS, registry=r
        )
        self.positions_per_forward = Histogram(
            "unmask_positions_per_forward",
            "positions (rows x padded width) each shared forward pass computed",
            buckets=POSITIONS,
            registry=r,
        )
        self.forward_seconds = Counter(
            "unmask_forward_seconds", "time spent in shared forward passes", registry=r
        )
        self.tokens_per_forward = Histogram(
            "unmask_tokens_per_forward", "tokens a lane generated per forward pass", buckets=ROWS, registry=r
        )

    def on_batch(self, tokens: int, nfe: int, seconds: float, rows: int) -> None:
        self.tokens.inc(tokens)
        self.nfe.inc(nfe)
        self.batch_seconds.observe(seconds)
        if nfe:
            self.tokens_per_forward.observe(tokens / nfe)
        self.tokens_per_s.set(tokens / max(seconds, 1e-9))
        self.nfe_per_s.set(nfe / max(seconds, 1e-9))

    def on_forward(self, rows: int, positions: int, seconds: float) -> None:
        self.rows_per_forward.observe(rows)
        self.positions_per_forward.observe(positions)
        self.forward_seconds.inc(seconds)
