"""Builds and runs a shard gRPC server: servicer, health, reflection, metrics, SIGTERM handling."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import NoReturn

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedding_service.allocator import release_free_memory, tune_allocator
from embedding_service.config import ShardConfig
from embedding_service.metrics import ShardMetrics
from embedding_service.servicer import CONTROL_PLANE, ShardServicer, add_to_server
from protos import embedding_shard_pb2
from protos.channels import channel_options, open_channel
from protos.process import exit_now
from protos.rejects import DecodeGuard, Rejects, quiet_grpc_decode_logs
from protos.security import CONTROL_TOKEN_ENV, ControlPlaneAuth, TlsConfig, TokenRule, bind, full_names, read_token

log = logging.getLogger(__name__)
SERVICE_NAME = embedding_shard_pb2.DESCRIPTOR.services_by_name["EmbeddingShard"].full_name


@dataclass
class RunningShard:
    server: grpc.Server
    servicer: ShardServicer
    health: health.HealthServicer
    port: int
    metrics_port: int | None

    def stop(self, grace: float = 30.0) -> None:
        """Stops accepting, lets in-flight RPCs finish (up to `grace` seconds)."""
        self.health.enter_graceful_shutdown()
        done = self.server.stop(grace)  # rejects new RPCs from here on
        self.servicer.steps.shutdown()  # requests blocked on other trainers fail now, not at the grace end
        done.wait()
        if self.servicer.publisher is not None:
            self.servicer.publisher.close()  # the last applied steps' rows go out too


def start(config: ShardConfig) -> RunningShard:
    torch.set_num_threads(config.compute_threads or max(1, (os.cpu_count() or 2) - 1))
    token = read_token(config.token_file, CONTROL_TOKEN_ENV)
    metrics = ShardMetrics()
    rejects = Rejects(metrics.registry, log)
    quiet_grpc_decode_logs(lambda: rejects.counter.labels("grpc", "undecodable").inc())
    servicer = ShardServicer(config, metrics, rejects=rejects, peer_token=token)
    opts = config.server
    workers = opts.workers or 16 + 4 * config.num_trainers
    interceptors: list[grpc.ServerInterceptor] = []
    if token:
        interceptors.append(ControlPlaneAuth([TokenRule(token, full_names(SERVICE_NAME, CONTROL_PLANE))],
                                             on_refusal=rejects.refused))
    interceptors.append(DecodeGuard(rejects, exempt=full_names(SERVICE_NAME, ("Lookup", "Update"))))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors,
                         options=channel_options(opts.max_message_bytes),
                         maximum_concurrent_rpcs=opts.max_concurrent_rpcs or 4 * workers)
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = bind(server, f"{opts.host}:{opts.port}", TlsConfig.from_paths(opts.tls_cert, opts.tls_key,
                                                                          opts.tls_client_ca))
    metrics_port = None
    if opts.metrics_port is not None:
        metrics_port = servicer.metrics.serve(opts.host, opts.metrics_port)
    server.start()
    if servicer.publisher is not None:
        servicer.publisher.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningShard(server, servicer, health_servicer, port, metrics_port)


def serve_forever(config: ShardConfig) -> NoReturn:
    """Runs until SIGTERM/SIGINT, then drains and exits 0. Announces the bound ports as one JSON line."""
    tune_allocator()
    shard = start(config)
    release_free_memory()
    info = {"event": "serving", "service": SERVICE_NAME, "host": config.server.host, "port": shard.port,
            "metrics_port": shard.metrics_port, "shard_id": config.assignment.shard_id,
            "plan_version": config.assignment.plan_version, "slices": len(config.assignment.slices),
            "checkpoint_root": str(shard.servicer.checkpoint_root), "mtls": bool(config.server.tls_client_ca),
            "control_token": bool(read_token(config.token_file, CONTROL_TOKEN_ENV)),
            "weight_bytes": shard.servicer.tables.weight_bytes,
            "optimizer_bytes": shard.servicer.tables.optimizer_bytes}
    if config.collective_rank is not None:
        from embedding_service.collective import CollectiveLoop

        CollectiveLoop(shard.servicer.tables, shard.servicer.steps, config.collective_rank,
                       config.collective_world_size or 0, config.num_trainers, config.collective_timeout_s).start()
        info["collective_rank"] = config.collective_rank
    agent = None
    if config.coordinator:
        from protos import coordinator_pb2
        from protos.member_agent import MemberAgent

        servicer = shard.servicer
        member = coordinator_pb2.Member(
            kind=coordinator_pb2.SHARD, id=config.assignment.shard_id, device=config.device,
            address=config.advertise or f"{config.server.host}:{shard.port}", capacity_bytes=config.capacity_bytes)
        agent = MemberAgent(config.coordinator, member, lambda: (servicer.plan_version, servicer.steps.applied_step),
                            channel=open_channel(config.coordinator, tls_ca=config.tls_ca,
                                                 tls_cert=config.server.tls_cert if config.tls_ca else None,
                                                 tls_key=config.server.tls_key if config.tls_ca else None),
                            on_fenced=lambda reason: servicer.metrics.fenced.set(1))
        servicer.member_check = agent.check  # every write asks the agent first: a replaced shard applies none
        agent.start()
        info["coordinator"] = config.coordinator
    print(json.dumps(info), flush=True)
    log.info("shard %d serving on %s:%d", config.assignment.shard_id, config.server.host, shard.port)
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("signal %d: draining", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(timeout=1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    if agent is not None:
        agent.stop()
    shard.stop(grace=30.0)
    log.info("shard %d stopped", config.assignment.shard_id)
    exit_now(0)
