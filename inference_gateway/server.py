"""Builds and runs the gateway: grpc.aio server with the project's API and the Open Inference Protocol
on one port, health (NOT_SERVING until a model is loaded), reflection, Prometheus metrics, SIGTERM drain,
and one JSON line announcing the bound ports."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inference_gateway.admission import AdmissionConfig
from inference_gateway.batching import BatchingConfig
from inference_gateway.control_plane import CONTROL_PLANE, PREDICT, SERVICE_NAME
from inference_gateway.follower import FollowSettings
from inference_gateway.freshness import Freshness
from inference_gateway.metrics import GatewayMetrics
from inference_gateway.requests import Limits
from inference_gateway.servicer import GatewayServicer
from protos import inference_pb2_grpc
from protos.channels import channel_options
from protos.cli_errors import EXIT_REFUSED, REFUSED, one_line
from protos.process import exit_now
from protos.rejects import AioDecodeGuard, Rejects, quiet_grpc_decode_logs
from protos.security import AioControlPlaneAuth, TlsConfig, TokenRule, bind, full_names

log = logging.getLogger(__name__)


@dataclass
class GatewayConfig:
    models: list[str] = field(default_factory=list)  # package directories loaded at start
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = 0
    device: str = "cpu"
    max_message_bytes: int = 64 << 20
    limits: Limits = field(default_factory=Limits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    access_log: bool = False
    grace_s: float = 10.0
    max_concurrent_rpcs: int = 0  # 0: unbounded
    max_pending_rpcs: int = 0  # 0: gRPC's default
    tls: TlsConfig | None = None  # with client_ca: mutual TLS, every RPC needs a client certificate
    model_store: str = "model_store"  # LoadModel: a package name or relative path under it (TorchServe's)
    token: str | None = None  # control plane (LoadModel, UnloadModel, SetDefaultVersion); None: open unless mTLS
    predict_token: str | None = None  # Predict / PredictStream; None: open
    follow: FollowSettings | None = None  # online freshness: apply the shards' row deltas from this Redis
    snapshots: str | None = None  # packages exported from checkpoints: where a follower resynchronises from


async def run(config: GatewayConfig, stop: asyncio.Event | None = None) -> None:
    """Serves until `stop` is set (or SIGTERM/SIGINT), then drains: health NOT_SERVING, no new RPCs,
    in-flight ones finish within the grace period, every queued request is answered."""
    from inference_gateway import oip  # package `inference`: loaded only by the serving process (see oip.py)

    torch.set_num_threads(1)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # past max_concurrent_rpcs gRPC itself answers RESOURCE_EXHAUSTED before any Python runs: the cheap
    # refusal that keeps accepted requests fast when the event loop, not the queue, is the bottleneck
    options = channel_options(config.max_message_bytes)
    if config.max_pending_rpcs:
        # RPCs gRPC accepted but the event loop has not picked up yet: past this they are refused
        # instead of waiting (gRPC's own default lets 1000 wait, then cancels them late)
        options += [("grpc.server.max_pending_requests", config.max_pending_rpcs),
                    ("grpc.server.max_pending_requests_hard_limit", 2 * config.max_pending_rpcs)]
    metrics = GatewayMetrics()
    rejects = Rejects(metrics.registry, log)
    quiet_grpc_decode_logs(lambda: rejects.counter.labels("grpc", "undecodable").inc())
    rules = []
    if config.token:
        rules.append(TokenRule(config.token, full_names(SERVICE_NAME, CONTROL_PLANE)))
    if config.predict_token:
        rules.append(TokenRule(config.predict_token,
                               full_names(SERVICE_NAME, PREDICT) | full_names(oip.SERVICE_NAME, oip.INFER)))
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if rules:
        interceptors.append(AioControlPlaneAuth(rules, on_refusal=rejects.refused))
    interceptors.append(AioDecodeGuard(rejects))
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
                             interceptors=interceptors)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer = GatewayServicer(limits=config.limits, batching=config.batching, metrics=metrics,
                               health_servicer=health_servicer, device=config.device, access_log=config.access_log,
                               model_store=config.model_store, admission=config.admission)
    servicer.loop = loop
    inference_pb2_grpc.add_InferenceGatewayServicer_to_server(servicer, server)
    oip.oip_grpc.add_GRPCInferenceServiceServicer_to_server(oip.OpenInferenceServicer(servicer), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, oip.SERVICE_NAME, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)
    port = bind(server, f"{config.host}:{config.port}", config.tls)
    metrics_port = metrics.serve(config.host, config.metrics_port) if config.metrics_port is not None else None
    await server.start()
    for path in config.models:  # the operator's own flags: a name under the model store, or a path as given
        in_store = os.path.join(config.model_store, path)
        await servicer.load(in_store if not os.path.isabs(path) and os.path.isdir(in_store) else path)
    freshness = None
    if config.follow is not None:
        if not len(servicer.registry):
            raise SystemExit("inference-gateway serve --follow: needs a --model to follow into")
        freshness = Freshness(config.follow, servicer.registry, metrics.registry, config.snapshots,
                              drain_s=config.grace_s).start()
    print(json.dumps({"event": "serving", "service": SERVICE_NAME, "services": [SERVICE_NAME, oip.SERVICE_NAME],
                      "host": config.host, "port": port,
                      "metrics_port": metrics_port, "pid": os.getpid(), "tls": config.tls is not None,
                      "mtls": bool(config.tls and config.tls.client_ca), "control_token": bool(config.token),
                      "predict_token": bool(config.predict_token),
                      "models": [{"name": i.name, "version": i.version, "table_bytes": i.table_bytes}
                                 for i in servicer.registry.infos()]}), flush=True)
    log.info("gateway serving on %s:%d", config.host, port)
    await stop.wait()
    log.info("draining")
    servicer.draining = True
    if freshness is not None:
        await asyncio.to_thread(freshness.close)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    for loaded in servicer.registry.all_loaded():
        await asyncio.to_thread(loaded.batcher.close, config.grace_s)
    log.info("gateway stopped")


def serve_forever(config: GatewayConfig) -> None:
    try:
        asyncio.run(run(config))
    except REFUSED as e:  # a package that does not load: one line, exit 2, not the event loop's teardown noise
        print(one_line("inference-gateway serve", str(e)), file=sys.stderr, flush=True)
        exit_now(EXIT_REFUSED)
    exit_now(0)  # drained
