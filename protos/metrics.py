"""Prometheus plumbing every server shares: RPC latency buckets and the /metrics endpoint.

Each server keeps its own registry (several servers may share a process in tests), so the endpoint
serves that registry alone.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

# RPC latency from half a millisecond (a cached lookup) to ten seconds (a step blocked on a slow trainer)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Starts the /metrics HTTP endpoint of `registry`; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_address[1])
