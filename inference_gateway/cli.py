"""`inference-gateway`: serve model packages over gRPC, send predictions, manage loaded models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from protos.cli_errors import quiet_library_info, run_command
from protos.process import exit_now

log = logging.getLogger("inference_gateway")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inference-gateway", description="Serve quantized DLRM packages "
                                "(from `trainer export`) over gRPC with dynamic batching.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve packages; prints one JSON line with the bound ports",
                       description="Health is NOT_SERVING until a model is loaded; SIGTERM drains and exits 0.")
    s.add_argument("--model", action="append", default=[], help="package directory (repeatable; the first "
                   "loaded version of each name is its default)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0, help="0 picks a free port (announced)")
    s.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port; -1 disables")
    s.add_argument("--device", default="cpu", help="cpu or cuda (TBE and dense arch)")
    s.add_argument("--max-batch-size", type=int, default=256, help="samples per merged batch")
    s.add_argument("--max-wait-ms", type=float, default=2.0, help="longest a request waits for a batch to fill")
    s.add_argument("--max-queue", type=int, default=4096, help="samples queued per model version before "
                   "RESOURCE_EXHAUSTED")
    s.add_argument("--max-queue-wait-ms", type=float, default=0.0, help="refuse a request at once "
                   "(RESOURCE_EXHAUSTED) when its expected queue wait (the measured compute time of the batches queued "
                   "ahead) is past "
                   "this; 0: no bound of its own. A request whose deadline is shorter than the expected wait is "
                   "refused either way")
    s.add_argument("--max-concurrent-rpcs", type=int, default=0, help="RPCs in flight before gRPC answers "
                   "RESOURCE_EXHAUSTED itself (cheap overload refusal); 0: unbounded")
    s.add_argument("--max-pending-rpcs", type=int, default=0, help="RPCs waiting for the event loop before "
                   "gRPC refuses more (0: gRPC's default)")
    s.add_argument("--workers", type=int, default=2, help="batching worker threads per model version")
    s.add_argument("--max-request-samples", type=int, default=4096, help="larger requests: RESOURCE_EXHAUSTED")
    s.add_argument("--max-request-ids", type=int, default=1 << 20, help="ids per request before RESOURCE_EXHAUSTED")
    s.add_argument("--access-log", action="store_true", help="one JSON line per request on the "
                   "inference_gateway.access logger (stderr)")
    s.add_argument("--model-store", default="model_store", help="LoadModel loads packages only from here, by name or "
                   "relative path (default ./model_store); relative --model paths resolve under it")
    _credential_flags(s, "", "Predict / PredictStream")
    _follow_flags(s, "apply the row deltas the shards publish (embedding-shard serve --publish-deltas) to the first "
                  "--model, within seconds of training", "loads the newest one as a new version")
    s.add_argument("--log-level", default="INFO")
    t = sub.add_parser(
        "serve-triton", help="serve packages on tritonserver's C++ frontend (KServe v2 gRPC) with supervised Python "
        "worker processes; prints one JSON line with the bound ports",
        description="tritonserver (from `pip install --no-deps nvidia-pytriton==0.7.0`) accepts, batches and answers "
        "requests; --workers Python processes score whole batches, all mapping one read-only copy of each package's "
        "tables. Inputs: serve's Open Inference Protocol schema in its batched form (dense FP32 [B, dense_features]; "
        "per feature <f>.lengths INT64 [B, 1] and <f>.values INT64 [B, K], bag b in the first lengths[b] entries of "
        "row b); output scores FP32 [B, 1]. The project's Predict / PredictStream / ListModels are on "
        "--predict-port (checked as serve checks them, then forwarded to tritonserver). Management (load / unload / "
        "set-default / models) is on --management-port; unversioned requests go to the highest loaded version. "
        "The supervisor replaces a dead worker (by reloading its version) and a dead tritonserver; SIGTERM drains "
        "and exits 0.")
    t.add_argument("--model", action="append", default=[], help="package directory (repeatable)")
    t.add_argument("--workers", type=int, default=2, help="Python worker processes per model version (on 2 "
                   "cores 2 pay off; with a queue bound see --max-queue)")
    t.add_argument("--host", default="127.0.0.1")
    t.add_argument("--port", type=int, default=0, help="KServe v2 gRPC port; 0 picks a free one (announced)")
    t.add_argument("--management-port", type=int, default=0, help="management gRPC port (0: free, announced)")
    t.add_argument("--predict-port", type=int, default=0, help="the project's Predict / PredictStream / ListModels "
                   "(recsys.v1.InferenceGateway), forwarded to tritonserver's port (0: free, announced)")
    t.add_argument("--predict-token-file", help="file holding the bearer token Predict / PredictStream need (as serve)")
    t.add_argument("--predict-target", help="HOST:PORT Predict forwards to as ModelInfer (default: this tritonserver; "
                   "any server of serve's OIP schema)")
    t.add_argument("--metrics-port", type=int, default=0, help="tritonserver's Prometheus port; -1 disables")
    t.add_argument("--max-batch-size", type=int, default=256, help="samples per batch a worker scores")
    t.add_argument("--max-wait-ms", type=float, default=0.5, help="longest a request waits for a batch to fill "
                   "while a worker is idle (Triton's max_queue_delay; busy workers batch what queued meanwhile). "
                   "Criteo W1, h2load at one stream: 2 ms holds each request ~1.5 ms longer than 0.5 (231 vs "
                   "372-417 req/s); at 64 and 512 streams no difference beyond the noise")
    t.add_argument("--max-queue", type=int, default=0, help="requests queued per model before Triton refuses "
                   "(UNAVAILABLE); 0: unbounded. Any bound (this or --max-queue-wait-ms) turns off the batcher's "
                   "prefetch of the next batches in Triton 2.51, and then a request that arrives while every "
                   "worker is busy can wait up to 500 ms (with --workers 1 often: 5x fewer requests/s at 64 "
                   "streams). Without one, clients' deadlines still cancel queued requests")
    t.add_argument("--max-queue-wait-ms", type=float, default=0.0, help="bound on a request's queue wait: Triton's "
                   "queue holds at most the requests the workers score in this time at --sample-cost-us each (a "
                   "request past it is refused at once, UNAVAILABLE), and one still queued after it is refused; "
                   "0: no bound of its own (see --max-queue for what a bound costs)")
    t.add_argument("--sample-cost-us", type=float, default=120.0, help="one worker's time per sample, for "
                   "--max-queue-wait-ms, frontend share included (Criteo W1 on 2 cores: ~140-170 us a one-sample "
                   "request at saturation; the model alone 22-35 us a sample batched)")
    t.add_argument("--request-samples", type=int, default=1, help="samples in a typical request, for "
                   "--max-queue-wait-ms: Triton's queue bound counts requests")
    t.add_argument("--allocator", choices=("auto", "jemalloc", "glibc"), default="auto", help="malloc of "
                   "tritonserver and its workers: jemalloc (LD_PRELOAD) costs ~10%% less CPU per request than "
                   "glibc's under concurrency; auto: jemalloc when installed (libjemalloc2), else glibc")
    t.add_argument("--grace-s", type=float, default=10.0, help="SIGTERM: how long in-flight requests may take")
    t.add_argument("--workdir", default="triton-gateway", help="model repository, table images, tritonserver.log")
    t.add_argument("--table-cache", help="where table images are written (default <workdir>/tables); the image "
                   "of a version this gateway unloads is deleted, so give each running gateway its own")
    t.add_argument("--model-store", default="model_store", help="LoadModel loads packages only from here")
    _follow_flags(t, "a follower process applies the row deltas and dense publishes to the newest version of the "
                  "first --model, in place in its (then private) table image; workers see each delta entry whole",
                  "rewrites the image from the newest one (same tables)")
    _credential_flags(t, " on --management-port", tls_where=" on --management-port and --predict-port "
                      "(tritonserver's --port stays plaintext)")
    t.add_argument("--log-level", default="INFO")
    n = sub.add_parser(
        "serve-native", help="serve packages on the native frontend (grpc++, built at install) with supervised "
        "Python worker processes; prints one JSON line with the bound ports",
        description="A native gRPC frontend accepts Predict, PredictStream and Open Inference Protocol (KServe v2) "
        "ModelInfer calls, "
        "batches them together and refuses overload at arrival (RESOURCE_EXHAUSTED); "
        "--workers Python processes score whole batches with serve's model and checks, all mapping one read-only "
        "copy of each package's tables. The supervisor replaces a worker that dies (health stays SERVING while one "
        "is connected) and exports the frontend's counters on /metrics; SIGTERM drains and exits 0. It serves "
        "recsys.v1.InferenceGateway Predict and PredictStream, inference.GRPCInferenceService (OIP inputs as serve "
        "takes them) and "
        "grpc.health.v1.Health on --port (no reflection there: serve has it). Management "
        "(load / unload / set-default / models, versions and defaults as serve has them) is on --management-port: "
        "a change starts workers with the new model set and retires the old ones after their batch in hand, so no "
        "request fails.")
    n.add_argument("--model", action="append", default=[], help="package directory (repeatable; the first is the "
                   "default model); a relative path resolves under --model-store when it is there")
    n.add_argument("--workers", type=int, default=2, help="Python worker processes (on 2 cores 2 pay off)")
    n.add_argument("--host", default="127.0.0.1")
    n.add_argument("--port", type=int, default=0, help="gRPC port; 0 picks a free one (announced)")
    n.add_argument("--management-port", type=int, default=0, help="management gRPC port (0: free, announced)")
    n.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port; -1 disables")
    n.add_argument("--max-batch-requests", type=int, default=256, help="requests per batch a worker scores")
    n.add_argument("--max-batch-bytes", type=int, default=131072, help="request bytes per batch (about samples: "
                   "one 256-sample Criteo request is ~120 KB), so one worker does not take every queued request")
    n.add_argument("--max-wait-ms", type=float, default=0.5, help="longest an idle worker waits for a batch to fill")
    n.add_argument("--max-queue-wait-ms", type=float, default=0.0, help="refuse a request at arrival "
                   "(RESOURCE_EXHAUSTED) when its expected queue wait is past this; 0: no bound of its own (a request "
                   "whose deadline is shorter than the expected wait is refused either way)")
    n.add_argument("--request-cost-us", type=int, default=70, help="a worker's time per queued request, for the "
                   "expected wait (Criteo INT8 on 2 cores: ~100 us for a one-sample request, both costs together); "
                   "the frontend scales both costs by the batch times it measures")
    n.add_argument("--byte-cost-ns", type=int, default=60, help="a worker's time per queued request byte, for the "
                   "expected wait (Criteo: ~7 ms for a 120 KB request)")
    n.add_argument("--grace-s", type=float, default=10.0, help="SIGTERM: how long queued and in-flight requests "
                   "may take")
    n.add_argument("--max-streams-per-connection", type=int, default=256, help="HTTP/2 streams (calls) one client "
                   "connection may have in flight at once (SETTINGS_MAX_CONCURRENT_STREAMS); a client past it waits "
                   "at its end. Past what the grpc engine can refuse (~40-50k calls/s on 2 cores) an open-loop client "
                   "without it drives every latency up together; 0: no bound")
    n.add_argument("--engine", choices=["grpc", "h2"], default="h2", help="the frontend's HTTP/2 engine: h2 "
                   "(nghttp2 and OpenSSL on one epoll thread: a call costs it 3-5 us of CPU in plaintext against "
                   "grpc++'s 17-27, answered or refused: benchmarks/h2_floor.py) or grpc (grpc++). Both serve every "
                   "method above, in plaintext or TLS")
    n.add_argument("--workdir", default="native-gateway", help="the workers' socket and (by default) table images")
    n.add_argument("--table-cache", help="where table images are written (default <workdir>/tables); the image "
                   "of a version this gateway unloads is deleted, so give each running gateway its own")
    n.add_argument("--model-store", default="model_store", help="LoadModel loads packages only from here")
    n.add_argument("--access-log", action="store_true", help="one JSON line per answered call on stderr, as serve's "
                   "inference_gateway.access logger writes them (method, request_id, model, version, samples, code, "
                   "ms, error)")
    _credential_flags(n, " on --management-port", "Predict and ModelInfer",
                      tls_where=" on --port and --management-port")
    n.add_argument("--allocator", choices=("auto", "jemalloc", "glibc"), default="auto", help="malloc of the "
                   "frontend and its workers: jemalloc (LD_PRELOAD) costs ~10%% less CPU per request than glibc's "
                   "at 512 streams (the same at 64); auto: jemalloc when installed (libjemalloc2, which make "
                   "install adds as root with apt-get), else glibc")
    n.add_argument("--frontend-scheduling", choices=("batch", "normal"), default="batch", help="Linux scheduling "
                   "policy of the native frontend's dispatcher threads (one per worker: each hands its worker "
                   "batches and answers the batch's calls). batch (SCHED_BATCH, no privilege needed): a dispatcher "
                   "woken by a worker's reply does not preempt another worker's batch, which on 2 cores cut the CPU "
                   "per W1 request by ~15%% (gRPC's threads, which refuse overload, keep SCHED_OTHER); normal: "
                   "SCHED_OTHER")
    n.add_argument("--worker-nice", type=int, default=10, help="the workers' niceness (0-19) once they have "
                   "loaded: on cores they share with the frontend, a worker yields to the frontend's threads, which "
                   "accept, refuse and answer calls, instead of making them wait out its time slice. With a W1 "
                   "overload forced on 2 cores (5 runs each), refusal p99 4.4-4.9 ms at 10 against 4.1-6.9 at 0; "
                   "half-load p99 within the noise (benchmarks/gateway_frontend.md). 0: the default priority")
    n.add_argument("--log-level", default="INFO")
    pr = sub.add_parser("predict", help="send requests from a JSON-lines file; prints scores",
                        description='Each line: {"dense": [[...]], "sparse": {"feature": [[ids], ...]}, '
                                    '"model"?, "version"?, "request_id"?}.')
    pr.add_argument("--address", required=True, help="HOST:PORT")
    pr.add_argument("--tls-ca", help="PEM of the CA that signed the gateway's certificate")
    pr.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    pr.add_argument("--tls-key", help="PEM private key of --tls-cert")
    pr.add_argument("--token-file", help="bearer token for Predict (a gateway started with --predict-token-file)")
    pr.add_argument("--file", required=True, help="requests.jsonl ('-' for stdin)")
    pr.add_argument("--timeout", type=float, default=30.0)
    pr.add_argument("--json", action="store_true", help="one JSON line per request")
    ls = sub.add_parser("models", help="list loaded models and their default versions")
    ls.add_argument("--address", required=True)
    ls.add_argument("--tls-ca", help="PEM of the CA that signed the gateway's certificate")
    ls.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    ls.add_argument("--tls-key", help="PEM private key of --tls-cert")
    ls.add_argument("--token-file", help="control-plane bearer token (default: env RECSYS_CONTROL_TOKEN)")
    ls.add_argument("--json", action="store_true")
    ld = sub.add_parser("load", help="load a package into a running gateway")
    ld.add_argument("--address", required=True)
    ld.add_argument("--tls-ca", help="PEM of the CA that signed the gateway's certificate")
    ld.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    ld.add_argument("--tls-key", help="PEM private key of --tls-cert")
    ld.add_argument("--token-file", help="control-plane bearer token (default: env RECSYS_CONTROL_TOKEN)")
    ld.add_argument("--path", required=True, help="package name or relative path under the gateway's --model-store")
    ld.add_argument("--name", default="")
    ld.add_argument("--version", type=int, default=0)
    ld.add_argument("--default", action="store_true", help="make it the default version")
    ld.add_argument("--json", action="store_true")
    ul = sub.add_parser("unload", help="unload one version (queued requests are answered first)")
    ul.add_argument("--address", required=True)
    ul.add_argument("--tls-ca", help="PEM of the CA that signed the gateway's certificate")
    ul.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    ul.add_argument("--tls-key", help="PEM private key of --tls-cert")
    ul.add_argument("--token-file", help="control-plane bearer token (default: env RECSYS_CONTROL_TOKEN)")
    ul.add_argument("--name", required=True)
    ul.add_argument("--version", type=int, required=True)
    sd = sub.add_parser("set-default", help="switch the default version (hot swap)")
    sd.add_argument("--address", required=True)
    sd.add_argument("--tls-ca", help="PEM of the CA that signed the gateway's certificate")
    sd.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    sd.add_argument("--tls-key", help="PEM private key of --tls-cert")
    sd.add_argument("--token-file", help="control-plane bearer token (default: env RECSYS_CONTROL_TOKEN)")
    sd.add_argument("--name", required=True)
    sd.add_argument("--version", type=int, required=True)
    sd.add_argument("--json", action="store_true")
    return p


def _follow_flags(p: argparse.ArgumentParser, how: str, resync: str) -> None:
    """--follow (what following does on this frontend), --snapshots (how it resynchronises from one) and
    --delta-namespace: both serve commands."""
    p.add_argument("--follow", metavar="REDIS_URL", help=f"online freshness: {how}")
    p.add_argument("--snapshots", help="with --follow: directory of packages exported from checkpoints; after a gap "
                   f"in the deltas (dropped rows, a trimmed stream) the follower {resync} and continues from its step")
    p.add_argument("--delta-namespace", default="recsys", help="key prefix of the delta streams")


def _credential_flags(p: argparse.ArgumentParser, where: str, predict: str | None = None,
                      tls_where: str | None = None) -> None:
    """The same credential flags for every serve command (read by `_credentials`). serve-triton has no
    predict token: Triton's restricted-protocol check wants the header `triton-grpc-protocol-<key>`, never
    `authorization`, so it cannot check a client's `authorization: Bearer`."""
    tls_where = where if tls_where is None else tls_where
    p.add_argument("--tls-cert", help=f"PEM certificate: serve TLS{tls_where} (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help=f"PEM CA of client certificates: mutual TLS, every RPC{tls_where} "
                   "needs one")
    p.add_argument("--token-file", help=f"control-plane bearer token for load / unload / set-default{where} "
                   "(default: env RECSYS_CONTROL_TOKEN; none: open unless mTLS)")
    if predict:
        p.add_argument("--predict-token-file", help=f"bearer token {predict} require (default: open)")


def _credentials(args: argparse.Namespace):
    """(control token, predict token, TlsConfig) from the flags of `_credential_flags`; SystemExit naming the
    file or flag (never a token) when one is unreadable, empty or half-configured."""
    from protos.security import CONTROL_TOKEN_ENV, TlsConfig, read_token

    try:
        return (read_token(getattr(args, "token_file", None), CONTROL_TOKEN_ENV, "token"),
                read_token(getattr(args, "predict_token_file", None), None, "predict token"),
                TlsConfig.from_paths(args.tls_cert, args.tls_key, args.tls_client_ca))
    except (OSError, ValueError) as e:
        raise SystemExit(f"inference-gateway {args.command}: {e}") from None


def serve_triton_cmd(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from inference_gateway.allocator import Allocator
    from inference_gateway.triton_frontend import FrontendConfig, FrontendError, run
    from protos.security import read_token

    if args.workers < 1:
        raise SystemExit("inference-gateway serve-triton: --workers: must be >= 1")
    if args.max_queue < 0:
        raise SystemExit("inference-gateway serve-triton: --max-queue: must be >= 0 (0: unbounded)")
    if args.max_queue_wait_ms < 0:
        raise SystemExit("inference-gateway serve-triton: --max-queue-wait-ms: must be >= 0 (0: no bound)")
    if args.sample_cost_us <= 0:
        raise SystemExit("inference-gateway serve-triton: --sample-cost-us: must be > 0")
    if args.request_samples < 1:
        raise SystemExit("inference-gateway serve-triton: --request-samples: must be >= 1")
    token, _, tls = _credentials(args)
    try:
        predict_token = read_token(args.predict_token_file, None, "predict token")
    except (OSError, ValueError) as e:
        raise SystemExit(f"inference-gateway serve-triton: {e}") from None
    cfg = FrontendConfig(models=args.model, workers=args.workers, host=args.host, port=args.port,
                         management_port=args.management_port, predict_port=args.predict_port,
                         predict_target=args.predict_target, predict_token=predict_token,
                         metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                         max_batch_size=args.max_batch_size, max_wait_us=int(args.max_wait_ms * 1000),
                         max_queue=args.max_queue, max_queue_wait_ms=args.max_queue_wait_ms,
                         sample_cost_us=args.sample_cost_us, request_samples=args.request_samples,
                         grace_s=args.grace_s, workdir=Path(args.workdir),
                         table_cache=Path(args.table_cache) if args.table_cache else None,
                         model_store=args.model_store, token=token, tls=tls, allocator=Allocator(args.allocator),
                         follow=args.follow, delta_namespace=args.delta_namespace, snapshots=args.snapshots)
    try:
        asyncio.run(run(cfg))
    except FrontendError as e:
        raise SystemExit(f"inference-gateway serve-triton: {e}") from None
    exit_now(0)


def serve_native_cmd(args: argparse.Namespace) -> int:
    from inference_gateway.allocator import Allocator
    from inference_gateway.native.supervisor import Engine, NativeConfig, run

    for flag, value, low in (("--workers", args.workers, 1), ("--max-batch-requests", args.max_batch_requests, 1),
                             ("--max-batch-bytes", args.max_batch_bytes, 1), ("--max-wait-ms", args.max_wait_ms, 0),
                             ("--max-queue-wait-ms", args.max_queue_wait_ms, 0),
                             ("--request-cost-us", args.request_cost_us, 0), ("--byte-cost-ns", args.byte_cost_ns, 0),
                             ("--grace-s", args.grace_s, 0),
                             ("--max-streams-per-connection", args.max_streams_per_connection, 0),
                             ("--worker-nice", args.worker_nice, 0)):
        if value < low:
            raise SystemExit(f"inference-gateway serve-native: {flag}: must be >= {low}")
    if args.max_streams_per_connection > 2**31 - 1:
        raise SystemExit("inference-gateway serve-native: --max-streams-per-connection: must be < 2^31")
    if args.worker_nice > 19:
        raise SystemExit("inference-gateway serve-native: --worker-nice: must be <= 19 (Linux's lowest priority)")
    token, predict_token, tls = _credentials(args)  # checked here; the frontend reads the files itself
    return run(NativeConfig(models=args.model, workers=args.workers, host=args.host, port=args.port,
                            management_port=args.management_port, metrics_port=args.metrics_port,
                            max_batch_requests=args.max_batch_requests,
                            max_batch_bytes=args.max_batch_bytes, max_wait_ms=args.max_wait_ms,
                            max_queue_wait_ms=args.max_queue_wait_ms, request_cost_us=args.request_cost_us,
                            byte_cost_ns=args.byte_cost_ns, grace_s=args.grace_s, workdir=args.workdir,
                            table_cache=args.table_cache, model_store=args.model_store, token=token,
                            predict_token_file=args.predict_token_file if predict_token else None, tls=tls,
                            access_log=args.access_log, allocator=Allocator(args.allocator),
                            frontend_sched_batch=args.frontend_scheduling == "batch",
                            max_streams=args.max_streams_per_connection, engine=Engine(args.engine),
                            worker_nice=args.worker_nice))


def serve_cmd(args: argparse.Namespace) -> int:
    from inference_gateway.admission import AdmissionConfig
    from inference_gateway.batching import BatchingConfig
    from inference_gateway.follower import FollowSettings
    from inference_gateway.requests import Limits
    from inference_gateway.server import GatewayConfig, serve_forever

    if args.max_queue_wait_ms < 0:
        raise SystemExit("inference-gateway serve: --max-queue-wait-ms: must be >= 0 (0: no bound)")
    token, predict_token, tls = _credentials(args)
    config = GatewayConfig(
        models=args.model, host=args.host, port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port, device=args.device,
        limits=Limits(args.max_request_samples, args.max_request_ids),
        batching=BatchingConfig(args.max_batch_size, args.max_wait_ms / 1000, args.max_queue, args.workers),
        admission=AdmissionConfig(max_queue_wait_s=args.max_queue_wait_ms / 1000),
        access_log=args.access_log,
        max_concurrent_rpcs=args.max_concurrent_rpcs, max_pending_rpcs=args.max_pending_rpcs,
        tls=tls, model_store=args.model_store, token=token, predict_token=predict_token,
        follow=FollowSettings(args.follow, args.delta_namespace) if args.follow else None, snapshots=args.snapshots)
    serve_forever(config)
    return 0


def _client(args: argparse.Namespace, predict: bool = False):
    from inference_gateway.client import GatewayClient
    from protos.security import CONTROL_TOKEN_ENV, read_token

    creds = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    if predict:
        return GatewayClient(args.address, predict_token=read_token(args.token_file, None, "predict token"), **creds)
    return GatewayClient(args.address, token=read_token(args.token_file, CONTROL_TOKEN_ENV), **creds)


def _info_dict(info) -> dict:
    return {"name": info.name, "version": info.version, "default": info.is_default, "path": info.path,
            "table_bytes": info.table_bytes, "table_dtypes": dict(info.table_dtypes),
            "dense_quantization": info.dense_quantization}


def predict_cmd(args: argparse.Namespace) -> int:
    import grpc

    from inference_gateway.client import request_from_json, scores_of

    stream = sys.stdin if args.file == "-" else open(args.file)  # noqa: SIM115 - closed below
    failures = 0
    with _client(args, predict=True) as client:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                req = request_from_json(json.loads(line))
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{args.file}:{n}: {e}") from None
            start = time.perf_counter()
            try:
                resp = client.predict_request(req, timeout=args.timeout)
                out = {"line": n, "request_id": resp.request_id, "model": resp.model, "version": resp.version,
                       "scores": [round(float(x), 6) for x in scores_of(resp)]}
            except grpc.RpcError as e:
                failures += 1
                out = {"line": n, "error": e.code().name, "message": e.details()}
            out["ms"] = round((time.perf_counter() - start) * 1000, 3)
            if args.json:
                print(json.dumps(out), flush=True)
            elif "error" in out:
                print(f"line {n}: {out['error']}: {out['message']}", flush=True)
            else:
                print(f"line {n}: " + " ".join(f"{s:.6f}" for s in out["scores"]), flush=True)
    if stream is not sys.stdin:
        stream.close()
    return 1 if failures else 0


def models_cmd(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = [_info_dict(i) for i in client.list_models()]
    if args.json:
        print(json.dumps(infos))
    else:
        for i in infos:
            print(f"{i['name']} v{i['version']}{' (default)' if i['default'] else ''}  {i['table_bytes']} table bytes"
                  f"  {i['path']}")
    return 0


def _manage(args: argparse.Namespace) -> int:
    import grpc

    with _client(args) as client:
        try:
            if args.command == "load":
                info = _info_dict(client.load_model(args.path, args.name, args.version, args.default))
            elif args.command == "unload":
                client.unload_model(args.name, args.version)
                info = {"name": args.name, "version": args.version, "unloaded": True}
            else:
                info = _info_dict(client.set_default_version(args.name, args.version))
        except grpc.RpcError as e:
            raise SystemExit(f"{args.command}: {e.code().name}: {e.details()}") from None
    print(json.dumps(info) if getattr(args, "json", False) else " ".join(f"{k}={v}" for k, v in info.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_info()
    commands = {"serve": serve_cmd, "serve-triton": serve_triton_cmd,
                "serve-native": serve_native_cmd, "predict": predict_cmd, "models": models_cmd,
                "load": _manage, "unload": _manage, "set-default": _manage}
    return run_command(f"inference-gateway {args.command}", commands[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
