"""Prometheus metrics of one gateway (own registry, so a test can run several in one process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos.metrics import serve_metrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("gateway_requests", "requests answered, by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("gateway_request_seconds", "request latency (arrival to answer)", ["method"],
                                 registry=r, buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("gateway_batch_samples", "samples per merged batch", registry=r,
                                    buckets=BATCH_BUCKETS)
        self.batch_requests = Histogram("gateway_batch_requests", "requests per merged batch", registry=r,
                                        buckets=BATCH_BUCKETS)
        self.compute = Histogram("gateway_compute_seconds", "TBE + dense time of one batch", registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.queue_depth = Gauge("gateway_queue_samples", "samples waiting in the batching queues", registry=r)
        self.rejects = Counter("gateway_rejects", "requests refused before compute, by reason", ["reason"],
                               registry=r)
        self.admission_refusals = Counter("gateway_admission_refusals", "requests answered RESOURCE_EXHAUSTED on "
                                          "arrival: expected queue wait past max_queue_wait_ms or the deadline",
                                          ["reason"], registry=r)
        self.models = Gauge("gateway_models_loaded", "model versions loaded", registry=r)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint; returns the bound port (port 0 picks one)."""
        return serve_metrics(self.registry, host, port)
