"""Prometheus metrics of the coordinator (own registry)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos.metrics import LATENCY_BUCKETS, serve_metrics


@dataclass
class CoordinatorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("coordinator_requests", "RPCs handled, by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("coordinator_request_seconds", "RPC latency (streams: until closed)", ["method"],
                                 registry=r, buckets=LATENCY_BUCKETS)
        self.members = Gauge("coordinator_members", "registered members by kind and state", ["kind", "state"],
                             registry=r)
        self.plan_version = Gauge("coordinator_plan_version", "the current plan version", registry=r)
        self.rollouts = Counter("coordinator_rollouts", "finished rollouts by outcome", ["outcome"], registry=r)
        self.rollout_pause = Histogram("coordinator_rollout_pause_seconds", "how long trainers were fenced",
                                       registry=r, buckets=(*LATENCY_BUCKETS, 30.0, 60.0, 120.0))
        self.migrated_bytes = Counter("coordinator_migrated_bytes", "bytes moved shard-to-shard by rollouts",
                                      registry=r)
        self._rpc_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def rpc_done(self, method: str, code: str, seconds: float) -> None:
        """Counts one RPC and its latency. The labelled children are looked up once per (method, code):
        `labels()` validates and locks on every call, at every heartbeat."""
        children = self._rpc_children.get((method, code))
        if children is None:
            children = self._rpc_children[(method, code)] = (self.requests.labels(method, code),
                                                              self.latency.labels(method))
        children[0].inc()
        children[1].observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint; returns the bound port (port 0 picks one)."""
        return serve_metrics(self.registry, host, port)
