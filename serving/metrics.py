"""Prometheus metrics of one gateway (prometheus-client), on their own registry so apps do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request counts and latency by endpoint and status, engine queue depth, batch sizes, gate results."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cleanplate_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("cleanplate_request_duration_seconds", "HTTP request latency in seconds",
                                 ["endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("cleanplate_stage_duration_seconds", "time per removal stage in seconds",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("cleanplate_queue_depth", "engine items waiting or running", registry=r)
        self.in_flight = Gauge("cleanplate_requests_in_flight", "HTTP requests being handled", registry=r)
        self.batch_size = Histogram("cleanplate_batch_size", "items per engine batch", ["queue"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("cleanplate_batch_duration_seconds", "engine time per batch in seconds",
                                       ["queue"], buckets=LATENCY_BUCKETS, registry=r)
        self.gate = Counter("cleanplate_gate_results_total", "gated removals by outcome", ["passed"], registry=r)
        self.gate_attempts = Histogram("cleanplate_gate_attempts", "model runs per gated removal",
                                       buckets=(1, 2, 3, 4, 6, 8, 16, 32, 64), registry=r)
        self.gate_pass_rate = Gauge("cleanplate_gate_pass_rate", "share of gated removals that passed", registry=r)
        self.ready = Gauge("cleanplate_engine_ready", "1 when the engine can take work", registry=r)
        self.memory_budget = Gauge("cleanplate_memory_budget_bytes", "admission budget for requests in flight",
                                   registry=r)
        self.memory_reserved = Gauge("cleanplate_memory_reserved_bytes", "working memory held by admitted requests",
                                     registry=r)
        self.admission_waiting = Gauge("cleanplate_admission_waiting", "requests waiting for working memory",
                                       registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes & co (Linux /proc)
        self._gated = [0, 0]  # passed, total

    def observe_batch(self, queue: str, size: int, seconds: float) -> None:
        self.batch_size.labels(queue).observe(size)
        self.batch_seconds.labels(queue).observe(seconds)

    def observe_gate(self, passed: bool, attempts: int) -> None:
        self.gate.labels(str(passed).lower()).inc()
        self.gate_attempts.observe(attempts)
        self._gated[0] += int(passed)
        self._gated[1] += 1
        self.gate_pass_rate.set(self._gated[0] / self._gated[1])

    def render(self) -> bytes:
        return generate_latest(self.registry)
