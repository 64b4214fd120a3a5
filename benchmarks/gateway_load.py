"""Load generator for the inference gateway on the Criteo-Kaggle model (JSON lines, one per result).

For each table dtype (FP32, INT8, INT4): the in-process batched limit of the same package, then a
real gateway process driven over gRPC from this process (async, pre-serialized requests):
  W1 one sample per request: closed loop at concurrency C; open loop at half the measured maximum;
     open loop at 2x the maximum (overload: accepted requests' latency, rejected share and speed).
  W1 over the Open Inference Protocol (ModelInfer, raw contents, as Triton's client sends): closed loop.
  W2 one user x 256 candidate items per request: closed loop; samples/s against the in-process limit.
The 2x overloads (W1, where the event loop is the bottleneck, and W2, where compute is) report goodput
against the closed-loop maximum, the accepted requests' p99, the refusal codes and how fast each code was
answered (admission answers RESOURCE_EXHAUSTED on arrival).
First, the W1 ceiling: the same client against a Predict that does no work at all (Python gRPC alone).
Latencies of the open loops count from each request's scheduled send time (no coordinated omission).

    python -m benchmarks.gateway_load [--dtypes fp32,int8,int4] [--seconds 5] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from inference_gateway.client import build_request
from inference_gateway.loadgen import OIP_METHOD, closed_loop, open_loop, stream_closed_loop
from inference_gateway.model import ServingModel
from inference_gateway.package import load_package
from inference_gateway.process import launch
from protos.model_config import ModelConfig
from trainer.export import ExportedModel, export_package, table_dtypes
from trainer.model import DenseDLRM

ROOT = Path(__file__).resolve().parent.parent


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def criteo_model() -> ExportedModel:
    cfg = ModelConfig.load(ROOT / "configs" / "criteo_kaggle.yaml")
    g = torch.Generator().manual_seed(0)
    tables = {}
    for t in cfg.tables:
        bound = (1.0 / t.num_rows) ** 0.5
        tables[t.name] = torch.empty(t.num_rows, t.dim).uniform_(-bound, bound, generator=g)
    return ExportedModel(cfg, DenseDLRM(cfg), tables, step=0)


def packages(workdir: Path, dtypes: list[str]) -> dict[str, Path]:
    out, model = {}, None
    for q in dtypes:
        path = workdir / f"criteo-{q}.pkg"
        if not (path / "manifest.json").exists():
            model = model or criteo_model()
            export_package(model, path, dtypes=table_dtypes(model.config, q, []), overwrite=True)
        out[q] = path
    return out


def samples(cfg: ModelConfig, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n samples, pooling factor 1, ids uniform per table (no cache helps)."""
    g = np.random.default_rng(seed)
    dense = g.standard_normal((n, cfg.dense_features), dtype=np.float32)
    lengths = np.ones(len(cfg.features) * n, dtype=np.int64)
    values = np.concatenate([g.integers(0, f.num_rows, n) for f in cfg.features]).astype(np.int64)
    return dense, lengths, values


def request_pool(cfg: ModelConfig, batch: int, count: int) -> list[bytes]:
    return [build_request(*samples(cfg, batch, i), request_id=str(i)).SerializeToString() for i in range(count)]


def infer_pool(cfg: ModelConfig, batch: int, count: int) -> list[bytes]:
    """The same samples as request_pool's, as serialized ModelInferRequests."""
    from inference_gateway.oip import infer_request  # package `inference` stubs: only where needed

    features = [f.name for f in cfg.features]
    return [infer_request(*samples(cfg, batch, i), features, request_id=str(i)).SerializeToString()
            for i in range(count)]


def in_process(pkg: Path, cfg: ModelConfig, batch: int, seconds: float, threads: int = 1) -> float:
    """Samples/s of the package's model, batch by batch (the limit a server approaches)."""
    torch.set_num_threads(threads)
    model = ServingModel(load_package(pkg))
    dense, lengths, values = (torch.from_numpy(a) for a in samples(cfg, batch, 0))
    for _ in range(5):
        model.scores(dense, lengths, values)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.scores(dense, lengths, values)
        n += 1
    return n * batch / (time.perf_counter() - start)


def _load() -> float:
    """1-minute load average: other work on the machine shows up here (this box has 2 cores)."""
    return round(os.getloadavg()[0], 2)


async def _echo_server() -> None:
    """The same Predict method answering an empty response without any work: what Python gRPC alone
    sustains with this client on this machine (the ceiling any Python gateway's W1 can reach)."""
    import grpc

    async def predict(request: bytes, context) -> bytes:
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "recsys.v1.InferenceGateway", {"Predict": grpc.unary_unary_rpc_method_handler(
            predict, request_deserializer=lambda b: b, response_serializer=lambda b: b)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "serving", "port": port}), flush=True)
    await server.wait_for_termination()


def echo_ceiling(pool: list[bytes], concurrency: int, seconds: float, workdir: Path) -> dict:
    from protos.process import start_announced

    proc, msg = start_announced(["benchmarks.gateway_load", "--echo-server"], workdir, what="echo server",
                                timeout=60)
    try:
        return asyncio.run(closed_loop(f"127.0.0.1:{msg['port']}", pool, concurrency, seconds, 1))
    finally:
        proc.kill()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,int8,int4")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64, help="W1 closed-loop clients")
    p.add_argument("--w2-concurrency", type=int, default=4, help="W2 closed-loop clients")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gateway-bench"))
    p.add_argument("--streams", type=int, default=8, help="W1 over PredictStream: streams x depth = concurrency")
    p.add_argument("--server-args", default="--max-batch-size 256 --max-wait-ms 2 --workers 2 --max-queue 2048 "
                   "--max-concurrent-rpcs 128 --max-pending-rpcs 128 --max-queue-wait-ms 30",
                   help="extra `inference-gateway serve` flags")
    p.add_argument("--skip", default="",
                   help="comma-separated phases to skip: echo,inprocess,w1,half,overload,stream,oip,w2")
    p.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo_server:
        asyncio.run(_echo_server())
        return 0
    skip = set(filter(None, args.skip.split(",")))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dtypes = args.dtypes.split(",")
    pkgs = packages(workdir, dtypes)
    cfg = ModelConfig.load(ROOT / "configs" / "criteo_kaggle.yaml")
    w1, w2 = request_pool(cfg, 1, 512), request_pool(cfg, 256, 16)
    w1_oip = infer_pool(cfg, 1, 512) if "oip" not in skip else []
    common = {"model": "criteo_kaggle", "cpus": os.cpu_count(), "server": args.server_args}
    if "echo" not in skip:
        r = echo_ceiling(w1, args.concurrency, args.seconds, workdir)
        emit({**common, "bench": "W1_echo_ceiling", "concurrency": args.concurrency, **r, "loadavg": _load()})
    for q in dtypes:
        pkg = load_package(pkgs[q])
        base = {**common, "dtype": q, "table_bytes": pkg.table_bytes,
                "float32_table_bytes": sum(t["float32_bytes"] for t in pkg.manifest["tables"])}
        del pkg
        limits = {}
        if "inprocess" not in skip:
            for b, threads in ((64, 1), (256, 1)):
                limits[b, threads] = in_process(pkgs[q], cfg, b, args.seconds / 2, threads)
                emit({**base, "bench": "in_process", "batch": b, "threads": threads,
                      "samples_per_s": round(limits[b, threads], 1), "loadavg": _load()})
        gw = launch(["--model", str(pkgs[q]), "--metrics-port", "-1", *args.server_args.split()],
                    workdir=workdir / f"gw-{q}")
        try:
            peak = None
            if "w1" not in skip:
                r = asyncio.run(closed_loop(gw.address, w1, args.concurrency, args.seconds, 1))
                peak = r["requests_per_s"]
                emit({**base, "bench": "W1_closed", "concurrency": args.concurrency, **r, "loadavg": _load()})
            if peak and "half" not in skip:
                r = asyncio.run(open_loop(gw.address, w1, peak / 2, args.seconds, 1))
                emit({**base, "bench": "W1_open_half_max", **r, "loadavg": _load()})
            if peak and "overload" not in skip:
                r = asyncio.run(open_loop(gw.address, w1, peak * 2, args.seconds, 1))
                emit({**base, "bench": "W1_open_2x_overload", "max_per_s": peak, **r,
                      "goodput_vs_max": round(r["requests_per_s"] / peak, 3), "loadavg": _load()})
            if "stream" not in skip:
                depth = max(1, args.concurrency // args.streams)
                r = asyncio.run(stream_closed_loop(gw.address, w1, args.streams, depth, args.seconds, 1))
                emit({**base, "bench": "W1_stream_closed", "concurrency": args.streams * depth,
                      "streams": args.streams, **r, "loadavg": _load()})
            if "oip" not in skip:
                r = asyncio.run(closed_loop(gw.address, w1_oip, args.concurrency, args.seconds, 1, OIP_METHOD))
                rec = {**base, "bench": "W1_oip_closed", "concurrency": args.concurrency, **r}
                if peak:
                    rec["vs_predict"] = round(r["requests_per_s"] / peak, 3)
                emit({**rec, "loadavg": _load()})
            if "w2" not in skip:
                r = asyncio.run(closed_loop(gw.address, w2, args.w2_concurrency, args.seconds, 256))
                rec = {**base, "bench": "W2_closed", "concurrency": args.w2_concurrency, "candidates": 256, **r}
                if (256, 1) in limits:  # the server runs 2 workers of one kernel thread each
                    rec["vs_in_process_256"] = round(r["samples_per_s"] / limits[256, 1], 3)
                emit({**rec, "loadavg": _load()})
                if "overload" not in skip:  # compute-bound overload: admission's own case (the loop keeps up)
                    peak2 = r["requests_per_s"]
                    r = asyncio.run(open_loop(gw.address, w2, peak2 * 2, args.seconds, 256))
                    emit({**base, "bench": "W2_open_2x_overload", "candidates": 256, "max_per_s": peak2, **r,
                          "goodput_vs_max": round(r["requests_per_s"] / peak2, 3), "loadavg": _load()})
        finally:
            gw.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
