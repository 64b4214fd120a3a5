"""The gateway's frontends side by side in one run (JSON lines): W1 (one sample per request) at
concurrency C against the Python gRPC echo ceiling, the Python gateway (`serve`) and tritonserver's
frontend over Python workers (`serve-triton`), each driven by the project's Python async client and
by h2load (native HTTP/2, so the client is not the bottleneck); the servers' CPU-seconds per 1,000 W1
requests (every process of the server, from /proc); RSS and PSS of each whole gateway, and of
`serve-triton` and `serve-native` with 1 and 2 workers (serve-native's against the issue's bound);
serve-triton W1 in both single-hot forms (`ids`, per-feature);
the project's Predict through the proxy (predict_proxy: serve-triton's --predict-port, `new`; and the proxy
alone in front of `serve`, `proxy`: its CPU is counted with serve's) against `serve`'s own Predict;
a W16 open loop at twice the maximum against serve-triton's queue bound; and how fast it refuses at
a full queue.

    python -m benchmarks.gateway_frontend [--seconds 5] [--concurrency 64] [--dtype int8] [--skip echo,memory]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.gateway_load import ROOT, _load, emit, packages, request_pool, samples
from benchmarks.h2 import ensure_h2load, h2load_with_cpu
from inference_gateway import proc_memory
from inference_gateway.loadgen import METHOD, closed_loop, open_loop
from inference_gateway.process import launch, launch_native, launch_triton
from inference_gateway.requests import lengths_input, values_input
from protos.model_config import ModelConfig
from protos.process import start_announced

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def model_infer_pool(cfg: ModelConfig, name: str, count: int, form: str = "ids", batch: int = 1) -> list[bytes]:
    """ModelInferRequests of `batch` samples for serve-triton (and serve): form "ids" is dense [B, D] and
    ids [B, features]; "per_feature" is dense and each feature's lengths [B, 1] and values [B, 1]."""
    from tritonclient.grpc import service_pb2

    out = []
    one = np.ones((batch, 1), dtype=np.int64)
    for i in range(count):
        dense, _, values = samples(cfg, batch, i)
        ids = values.reshape(len(cfg.features), batch)  # feature-major
        r = service_pb2.ModelInferRequest(model_name=name, id=str(i))
        tensors = [("dense", "FP32", dense)]
        if form == "ids":
            tensors.append(("ids", "INT64", np.ascontiguousarray(ids.T)))
        else:
            for f, v in zip(cfg.features, ids, strict=True):
                tensors += [(lengths_input(f.name), "INT64", one),
                            (values_input(f.name), "INT64", v.reshape(batch, 1))]
        for n, dt, arr in tensors:
            t = r.inputs.add()
            t.name, t.datatype = n, dt
            t.shape.extend(arr.shape)
            r.raw_input_contents.append(arr.tobytes())
        out.append(r.SerializeToString())
    return out


def measure(name: str, address: str, method: str, pool: list[bytes], root_pid: int | list[int], args, workdir: Path,
            base: dict, has_h2load: bool) -> None:
    """W1 with both clients; CPU of every process under root_pid(s) per 1,000 requests (h2load run)."""
    r = asyncio.run(closed_loop(address, pool, args.concurrency, args.seconds, 1, method=method))
    emit({**base, "bench": "W1_closed", "server": name, "client": "python", "concurrency": args.concurrency, **r,
          "loadavg": _load()})
    if has_h2load:
        pids = [p for root in (root_pid if isinstance(root_pid, list) else [root_pid]) for p in proc_memory.tree(root)]
        r = h2load_with_cpu(address, method, pool[0], args.concurrency, args.seconds, workdir, pids)
        emit({**base, "bench": "W1_closed", "server": name, "client": "h2load", "concurrency": args.concurrency,
              **r, "loadavg": _load()})


def memory(name: str, root_pid: int, base: dict, **extra) -> None:
    """Whole gateway, and per process: its PSS and the PSS of its share of the table image."""
    m = proc_memory.total(root_pid)
    parts = []
    for pid in proc_memory.tree(root_pid):
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        r, img = proc_memory.rollup(pid), proc_memory.mapped(pid, ".tbe")
        parts.append({"process": comm, "rss_mib": round(r["rss"] / 2**20, 1), "pss_mib": round(r["pss"] / 2**20, 1),
                      "table_image_pss_mib": round(img["pss"] / 2**20, 1)})
    emit({**base, "bench": "memory", "server": name, **extra, "rss_mib": round(m["rss"] / 2**20, 1),
          "pss_mib": round(m["pss"] / 2**20, 1), "processes": m["processes"], "by_process": parts})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--dtype", default="int8")
    p.add_argument("--workers", type=int, default=2, help="serve-triton workers for the W1 figures")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gateway-bench"))
    p.add_argument("--skip", default="", help="comma-separated: echo,old,proxy,new,memory,per_feature,overload,refusal")
    p.add_argument("--triton-args", default="", help="extra `serve-triton` flags for the W1 figures")
    p.add_argument("--overload-samples", type=int, default=16, help="samples per request in the overload phase")
    p.add_argument("--overload-args", default="--max-queue-wait-ms 30 --request-samples 16",
                   help="extra `serve-triton` flags in the overload phase (its queue bound)")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pkg = packages(workdir, [args.dtype])[args.dtype]
    cfg = ModelConfig.load(ROOT / "configs" / "criteo_kaggle.yaml")
    w1 = request_pool(cfg, 1, 512)
    has_h2load = ensure_h2load() is not None
    base = {"model": "criteo_kaggle", "dtype": args.dtype, "cpus": os.cpu_count(), "h2load": has_h2load}
    if "echo" not in skip:
        proc, msg = start_announced(["benchmarks.gateway_load", "--echo-server"], workdir, what="echo server",
                                    timeout=120)
        try:
            measure("python_echo", f"127.0.0.1:{msg['port']}", METHOD, w1, proc.pid, args, workdir, base, has_h2load)
        finally:
            proc.kill()
            proc.wait(10)
    if "old" not in skip:
        gw = launch(["--model", str(pkg), "--metrics-port", "-1", "--max-batch-size", "256", "--max-wait-ms", "2",
                     "--workers", "2", "--max-queue", "2048", "--max-concurrent-rpcs", "128",
                     "--max-pending-rpcs", "128"],
                    workdir=workdir / "old-gw", timeout=300)
        try:
            memory("serve", gw.pid, base)
            measure("serve", gw.address, METHOD, w1, gw.pid, args, workdir, base, has_h2load)
        finally:
            gw.terminate()
    if "proxy" not in skip:  # Predict -> proxy -> serve's ModelInfer: what the proxy adds to a Python target
        gw = launch(["--model", str(pkg), "--metrics-port", "-1", "--max-batch-size", "256", "--max-wait-ms", "2",
                     "--workers", "2", "--max-queue", "2048"], workdir=workdir / "proxy-target", timeout=300)
        proxy = None
        try:
            (workdir / "proxy").mkdir(exist_ok=True)
            proxy, msg = start_announced(["inference_gateway.predict_proxy", "--target", gw.address, "--model",
                                          str(pkg)], workdir / "proxy", what="predict proxy", timeout=300)
            measure("predict_proxy_to_serve", f"127.0.0.1:{msg['port']}", METHOD, w1, [proxy.pid, gw.pid], args,
                    workdir, base, has_h2load)
        finally:
            if proxy is not None:
                proxy.kill()
                proxy.wait(10)
            gw.terminate()
    name = json.loads((pkg / "manifest.json").read_text())["name"]
    infer_pool = model_infer_pool(cfg, name, 512)
    per_feature_pool = model_infer_pool(cfg, name, 512, "per_feature")
    counts = sorted({1, 2, args.workers}) if "memory" not in skip else [args.workers]
    for n in counts:
        gw = launch_triton(["--model", str(pkg), "--workers", str(n), "--max-batch-size", "256", "--max-wait-ms", "2",
                            *args.triton_args.split()], workdir=workdir / f"triton-gw-{n}", timeout=600)
        try:
            if "memory" not in skip:  # idle, model loaded: the table image is resident (MAP_POPULATE)
                image = next((workdir / f"triton-gw-{n}" / "triton" / "tables").glob("*.tbe")).stat().st_size
                memory("serve-triton", gw.pid, base, workers=n, table_image_mib=round(image / 2**20, 1))
            if n == args.workers and "new" not in skip:
                measure(f"serve-triton_{n}w", gw.address, MODEL_INFER, infer_pool, gw.pid, args, workdir, base,
                        has_h2load)
                if "per_feature" not in skip:
                    measure(f"serve-triton_{n}w_per_feature", gw.address, MODEL_INFER, per_feature_pool, gw.pid,
                            args, workdir, base, has_h2load)
                measure(f"serve-triton_{n}w_predict_port", f"127.0.0.1:{gw.announced['predict_port']}", METHOD, w1,
                        gw.pid, args, workdir, base, has_h2load)
        finally:
            gw.terminate(timeout=120)
    if "memory" not in skip:
        native_memory(pkg, workdir, base)
    if "overload" not in skip:
        overload(pkg, cfg, name, args, workdir, base)
    if "refusal" not in skip and has_h2load:
        refusal(pkg, cfg, name, args, workdir, base)
    return 0


def native_memory(pkg: Path, workdir: Path, base: dict) -> None:
    """serve-native idle with the model loaded, 1 and 2 workers, then the issue's bound: the whole gateway
    with 2 workers <= (one worker's resident + an empty worker's) x 1.1, an empty worker being one worker's
    resident less the table image it maps (the image is mapped MAP_POPULATE, so all of it is resident)."""
    worker_rss, image = 0, 0
    for n in (1, 2):
        gw = launch_native(["--model", str(pkg), "--workers", str(n), "--metrics-port", "-1"],
                           workdir=workdir / f"native-gw-{n}")
        try:
            image = next((workdir / f"native-gw-{n}" / "native" / "tables").glob("*.tbe")).stat().st_size
            memory("serve-native", gw.pid, base, workers=n, table_image_mib=round(image / 2**20, 1))
            if n == 1:
                worker_rss = proc_memory.rollup(gw.announced["worker_pids"][0])["rss"]
            else:
                whole = proc_memory.total(gw.pid)
        finally:
            gw.terminate(timeout=120)
    bound = (worker_rss + (worker_rss - image)) * 1.1
    emit({**base, "bench": "memory_bound", "server": "serve-native", "workers": 2,
          "one_worker_rss_mib": round(worker_rss / 2**20, 1),
          "empty_worker_mib": round((worker_rss - image) / 2**20, 1),
          "bound_mib": round(bound / 2**20, 1), "rss_mib": round(whole["rss"] / 2**20, 1),
          "pss_mib": round(whole["pss"] / 2**20, 1), "met_on_pss": whole["pss"] <= bound,
          "met_on_rss": whole["rss"] <= bound})


def refusal(pkg: Path, cfg: ModelConfig, name: str, args, workdir: Path, base: dict) -> None:
    """How fast serve-triton refuses at a full queue, from one sequential probe (so the probe queues
    behind nothing of its own): h2load floods a one-worker serve-triton (--max-queue 1) with W256
    requests meanwhile; the probe sends W1 requests 10 ms apart."""
    import grpc

    flood = model_infer_pool(cfg, name, 1, batch=256)[0]
    probes = model_infer_pool(cfg, name, 16)
    gw = launch_triton(["--model", str(pkg), "--workers", "1", "--max-batch-size", "256", "--max-queue", "1"],
                       workdir=workdir / "triton-gw-refusal", timeout=600)
    body = workdir / "flood-w256.bin"
    body.write_bytes(b"\0" + struct.pack(">I", len(flood)) + flood)
    h2 = subprocess.Popen(["h2load", "-D", str(int(args.seconds) + 10), "-c", "2", "-m", "8", "-H",
                           "content-type: application/grpc", "-H", "te: trailers", "-d", str(body),
                           f"http://{gw.address}{MODEL_INFER}"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(2)  # the queue fills
        lat: dict[str, list[float]] = {}
        with grpc.insecure_channel(gw.address) as channel:
            call = channel.unary_unary(MODEL_INFER)
            stop = time.perf_counter() + args.seconds
            i = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    call(probes[i % len(probes)], timeout=10)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name + (":queue_full" if "maximum queue size" in (e.details() or "") else "")
                lat.setdefault(code, []).append(time.perf_counter() - t0)
                i += 1
                time.sleep(0.01)
        emit({**base, "bench": "refusal_at_full_queue", "server": "serve-triton_1w", "flood": "h2load W256 x16",
              **{code: {"n": len(v), "p50_ms": round(float(np.percentile(v, 50)) * 1000, 2),
                        "p99_ms": round(float(np.percentile(v, 99)) * 1000, 2)} for code, v in lat.items()},
              "loadavg": _load()})
    finally:
        h2.kill()
        h2.wait()
        gw.terminate(timeout=120)


def overload(pkg: Path, cfg: ModelConfig, name: str, args, workdir: Path, base: dict) -> None:
    """Requests of --overload-samples each (few enough per second that one Python client can offer twice
    the maximum): the closed-loop maximum at concurrency 16, then an open loop at twice that against
    serve-triton with --overload-args (its queue bound)."""
    b = args.overload_samples
    pool = model_infer_pool(cfg, name, 128, batch=b)
    gw = launch_triton(["--model", str(pkg), "--workers", str(args.workers), "--max-batch-size", "256",
                        "--max-wait-ms", "2", *args.overload_args.split()], workdir=workdir / "triton-gw-overload",
                       timeout=600)
    try:
        r = asyncio.run(closed_loop(gw.address, pool, 16, args.seconds, b, method=MODEL_INFER))
        peak = r["requests_per_s"]
        emit({**base, "bench": f"W{b}_closed", "server": f"serve-triton_{args.workers}w", "concurrency": 16,
              "triton_args": args.overload_args, **r, "loadavg": _load()})
        r = asyncio.run(open_loop(gw.address, pool, peak * 2, args.seconds, b, method=MODEL_INFER))
        emit({**base, "bench": f"W{b}_open_2x_overload", "server": f"serve-triton_{args.workers}w",
              "triton_args": args.overload_args, "max_per_s": peak, **r,
              "goodput_vs_max": round(r["requests_per_s"] / peak, 3), "loadavg": _load()})
    finally:
        gw.terminate(timeout=120)


if __name__ == "__main__":
    sys.stdout.flush()
    raise SystemExit(main())
