"""Prometheus metrics of one shard server (own registry, so several servers can share a process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos.metrics import LATENCY_BUCKETS, serve_metrics


@dataclass
class ShardMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("shard_requests", "RPCs handled, by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("shard_request_seconds", "RPC latency", ["method"], registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.compute = Histogram("shard_compute_seconds", "TBE kernel time by phase", ["phase"], registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.rows_looked_up = Counter("shard_rows_looked_up", "ids looked up (pooled lookups)", registry=r)
        self.rows_updated = Counter("shard_rows_updated", "ids whose rows received gradients", registry=r)
        self.weight_bytes = Gauge("shard_weight_bytes", "bytes of embedding weights held", registry=r)
        self.optimizer_bytes = Gauge("shard_optimizer_bytes", "bytes of optimizer state held", registry=r)
        self.pending_handles = Gauge("shard_pending_handles", "lookup handles awaiting their update", registry=r)
        self.rows_migrated = Counter("shard_rows_migrated", "rows pulled into a staged plan", registry=r)
        self.bytes_migrated = Counter("shard_bytes_migrated", "bytes (weights + optimizer state) pulled into a staged "
                                      "plan", registry=r)
        self.plan_version = Gauge("shard_plan_version", "the live plan version", registry=r)
        self.inflight_requests = Gauge("shard_inflight_lookups", "Lookup requests inside the shard (running or "
                                       "waiting for their step)", registry=r)
        self.fenced = Gauge("shard_fenced", "1 once the coordinator replaced this shard (its epoch superseded): it "
                            "applies no write", registry=r)
        self.applied_step = Gauge("shard_applied_step", "last step whose update was applied", registry=r)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint; returns the bound port (port 0 picks one)."""
        return serve_metrics(self.registry, host, port)
