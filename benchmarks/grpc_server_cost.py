"""CPU per unary call of gRPC Python's two servers: the thread-pool server (the coordinator's) against grpc.aio.

A server process answers the coordinator's `Heartbeat` with a constant response (no Redis, no
interceptors: only gRPC's own machinery), once as `grpc.server(ThreadPoolExecutor)` and once as
`grpc.aio.server()`. Client processes send heartbeats open-loop at `--rate` calls/s in all (as a fleet's
agents do: each call on its own schedule, many in flight). Measured over `--window-s`: the server
process's CPU (user + system) per call and in cores, and client-side latency p50 / p99. One JSON line per
server kind. It decides whether moving the coordinator to grpc.aio would pay: its handlers call Redis
synchronously, so an aio coordinator needs an async Redis client as well.

    python -m benchmarks.grpc_server_cost [--rate 600] [--window-s 15] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import threading
import time
from concurrent import futures

import grpc
import psutil

from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.process import free_port

pb = coordinator_pb2
WORKERS = 64  # the coordinator's unary concurrency


class _Beat(coordinator_pb2_grpc.CoordinatorServicer):
    def Heartbeat(self, request, context):
        return pb.HeartbeatResponse(known=True, plan_version=1)


class _AioBeat(coordinator_pb2_grpc.CoordinatorServicer):
    async def Heartbeat(self, request, context):
        return pb.HeartbeatResponse(known=True, plan_version=1)


def _serve(kind: str, port: int, ready, stop) -> None:
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(_Beat(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        ready.set()
        stop.wait()
        server.stop(0)
        return

    async def main() -> None:
        server = grpc.aio.server()
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(_AioBeat(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await server.stop(0)

    asyncio.run(main())


def _client(port: int, rate: float, start_at: float, end_at: float, results) -> None:
    """Open loop: a call every 1/rate s (each with its own callback), latencies of those sent in the window."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    grpc.channel_ready_future(channel).result(timeout=30)
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    req = pb.HeartbeatRequest(kind=pb.SHARD, id=1, instance="x" * 32, plan_version=1, step=100, epoch=1)

    def done(fut, t0: float, measured: bool) -> None:
        dt = time.perf_counter() - t0
        with lock:
            if fut.exception() is not None:
                errors[0] += 1
            elif measured:
                lat.append(dt)

    period, nxt = 1.0 / rate, time.time()
    pending = []
    while nxt < end_at + 1.0:
        now = time.time()
        if now < nxt:
            time.sleep(nxt - now)
        t0 = time.perf_counter()
        fut = stub.Heartbeat.future(req, timeout=10)
        measured = start_at <= nxt <= end_at
        fut.add_done_callback(lambda f, t0=t0, m=measured: done(f, t0, m))
        pending.append(fut)
        nxt += period
    for f in pending:  # failures were counted by the callback
        with contextlib.suppress(grpc.RpcError):
            f.result(timeout=15)
    channel.close()
    results.put({"lat": lat, "errors": errors[0]})


def _pct(values: list[float], q: float) -> float | None:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2) if s else None


def measure(kind: str, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    port = free_port()
    server = ctx.Process(target=_serve, args=(kind, port, ready, stop), daemon=True)
    server.start()
    try:
        if not ready.wait(60):
            raise TimeoutError(f"{kind} server did not start")
        sproc = psutil.Process(server.pid)
        start_at = time.time() + args.warmup_s + 2.0  # clients connect meanwhile
        end_at = start_at + args.window_s
        clients = [ctx.Process(target=_client, args=(port, args.rate / args.clients, start_at, end_at, results),
                               daemon=True) for _ in range(args.clients)]
        for c in clients:
            c.start()
        time.sleep(max(0.0, start_at - time.time()))
        t = sproc.cpu_times()
        c0, t0 = t.user + t.system, time.time()
        time.sleep(max(0.0, end_at - time.time()))
        t = sproc.cpu_times()
        c1, t1 = t.user + t.system, time.time()
        out = [results.get(timeout=120) for _ in clients]
        for c in clients:
            c.join(timeout=30)
    finally:
        stop.set()
        server.join(timeout=30)
        if server.is_alive():
            server.kill()
    lat = [x for o in out for x in o["lat"]]
    window = t1 - t0
    calls_per_s = len(lat) / args.window_s
    cores = (c1 - c0) / window
    return {"benchmark": "grpc_server_cost", "server": kind, "rate_per_s": args.rate,
            "calls_per_s": round(calls_per_s, 1), "server_cores": round(cores, 3),
            "server_cpu_us_per_call": round(cores / calls_per_s * 1e6, 1) if calls_per_s else None,
            "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99), "errors": sum(o["errors"] for o in out),
            "host_load_1m": round(psutil.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=600.0, help="heartbeats per second, all clients together")
    ap.add_argument("--window-s", type=float, default=15.0)
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--servers", nargs="+", choices=("sync", "aio"), default=["sync", "aio"])
    args = ap.parse_args(argv)
    if args.rate <= 0 or args.window_s <= 0 or args.clients < 1:
        ap.error("--rate and --window-s must be > 0, --clients >= 1")
    for kind in args.servers:
        print(json.dumps(measure(kind, args)), flush=True)


if __name__ == "__main__":
    main()
