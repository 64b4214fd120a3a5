"""What the native frontend buys: serve-native (grpc++ over Python batch workers) against serve-triton.

serve-triton misses issue 12's "CPU per W1 request <= 1/3 of the Python echo's" target and
benchmarks.triton_floor shows why: tritonserver with a Python-backend model that does nothing already
costs 0.34-0.43x the echo. This measures the other design the issue names, a native frontend that
accepts, batches and answers requests with Python computing whole batches: `inference-gateway
serve-native` (inference_gateway/native/: frontend.cc on Debian's grpc++ callback API, and worker.py,
serve's own decode/validate/ServingModel over the shared table image). In one run, all servers up at
once and measured in turn per round, h2load at 64 and 512 streams, W1 (one Criteo sample a request):

- python_echo: gateway_load's no-work Python gRPC Predict (the ceiling the targets are relative to);
- native_echo: frontend.cc answering at once (grpc++'s own cost per call);
- native: frontend.cc + `--workers` Python workers, the INT8 Criteo package, Predict;
- serve_triton: `inference-gateway serve-triton`, same package and workers, OIP ModelInfer.

Every record gives answered calls/s (DATA bytes over one answer's frame, so admission refusals do not
count), CPU ms per answered call of the server's processes, and ratios to the echo of the same round;
then the medians. Then, for native and serve_triton, gateway_load's open loop (h2load's rate
mode plus the native probe that sees each status) at half the server's median maximum (512 streams), for
p99, and at twice it: goodput, accepted p99, and how fast and with which code refusals come. The
native frontend admits by expected queue wait (`--native-args`, default `--max-queue-wait-ms 20`: about
400 queued W1 requests with 2 workers, or 6 W2 ones) and refuses RESOURCE_EXHAUSTED at arrival.
Before measuring, the native server's scores are checked against the package scored in this process.
Needs g++ and grpc++ (Debian: `apt-get install g++ libgrpc++-dev pkg-config`, done here when missing
and running as root) and h2load.

    python -m benchmarks.native_floor [--rounds 3] [--seconds 5] [--workers 2] [--skip serve_triton,open]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.gateway_load import (
    Run,
    _load,
    answer_frame_bytes,
    emit,
    infer_pool,
    packages,
    rate_phase,
    request_pool,
    samples,
)
from benchmarks.h2 import ensure_h2load, h2load_with_cpu
from inference_gateway import proc_memory
from inference_gateway.batching import merge
from inference_gateway.client import build_request
from inference_gateway.loadgen import METHOD, OIP_METHOD
from inference_gateway.model import ServingModel
from inference_gateway.native.build import build
from inference_gateway.process import launch_native, launch_triton
from inference_gateway.requests import Limits, decode
from protos import inference_pb2
from protos.model_config import ModelConfig
from protos.package import load_package
from protos.process import start_announced, stop_all

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("python_echo", "native_echo", "native", "serve_triton")
PHASES = (*SERVERS, "open")


def start_binary(cmd: list[str], workdir: Path, timeout: float) -> tuple[subprocess.Popen, int]:
    """A native server; its port from the `{"event": "serving"}` line (after its workers connected)."""
    log = (workdir / f"{Path(cmd[0]).name}-{time.monotonic_ns()}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{cmd[0]} exited with {proc.wait()}: see {log.name}")
        msg = json.loads(line)
        if msg.get("event") == "serving":
            return proc, msg["port"]
    proc.kill()
    raise TimeoutError(f"{cmd[0]} did not announce its port within {timeout}s")


def check_scores(address: str, cfg: ModelConfig, pkg: Path, rounds: int = 20) -> dict:
    """The native server's answers == serve's model in this process, for requests sent at once so the
    batcher merges them: 1, 3 and 2 samples (the worker's one-validate-per-batch path), every other round
    with a request holding a NaN that must get serve's INVALID_ARGUMENT and spoil none of the others
    (the request-by-request path); then a body that is no PredictRequest (INVALID_ARGUMENT) and a request
    for another model (NOT_FOUND), after which the workers still answer."""
    model = ServingModel(load_package(pkg))
    good = [build_request(*samples(cfg, b, 100 + i), request_id=str(i)) for i, b in enumerate((1, 3, 2))]
    dense, lengths, values = samples(cfg, 2, 7)
    dense[1, 4] = np.nan
    bad = build_request(dense, lengths, values, request_id="bad")
    want = [model.scores(*merge([decode(r, model, Limits())])).numpy() for r in good]
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)
        for k in range(rounds):
            futures = [call.future(r.SerializeToString(), timeout=30) for r in (*good, bad)[:len(good) + k % 2]]
            if k % 2:
                try:
                    futures.pop().result()
                    raise SystemExit("native_floor: a request with a NaN was answered")
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.INVALID_ARGUMENT or "NaN" not in e.details():
                        raise SystemExit(f"native_floor: NaN request got {e.code()}: {e.details()}") from None
            for f, w in zip(futures, want, strict=True):
                got = np.frombuffer(inference_pb2.PredictResponse.FromString(f.result()).scores.data, dtype=np.float32)
                if not np.array_equal(got, w):
                    raise SystemExit(f"native_floor: native scores {got} differ from the package's {w}")
        other = build_request(*samples(cfg, 1, 3), model="other")
        for body, code, words in ((b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a PredictRequest"),
                                  (other.SerializeToString(), grpc.StatusCode.NOT_FOUND, "'other'")):
            try:
                call(body, timeout=30)
                raise SystemExit(f"native_floor: a request that should get {code.name} was answered")
            except grpc.RpcError as e:
                if e.code() != code or words not in e.details():
                    raise SystemExit(f"native_floor: expected {code.name} ({words}), got {e.code()}: "
                                     f"{e.details()}") from None
        got = np.frombuffer(inference_pb2.PredictResponse.FromString(call(good[0].SerializeToString(), timeout=30))
                            .scores.data, dtype=np.float32)
        if not np.array_equal(got, want[0]):  # the worker kept serving
            raise SystemExit("native_floor: scores changed after the bad requests")
    return {"rounds": rounds, "requests": rounds * len(good) + rounds // 2 + 3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="each server measured once per round; medians at the end")
    p.add_argument("--seconds", type=float, default=5.0, help="per h2load run")
    p.add_argument("--workers", type=int, default=2, help="Python workers of native and serve-triton")
    p.add_argument("--dtype", default="int8", help="table dtype of the Criteo package")
    p.add_argument("--skip", default="", help=f"what to leave out, comma-separated: {','.join(PHASES)}")
    p.add_argument("--native-args", default="--max-queue-wait-ms 20", help="extra `inference-gateway serve-native` "
                   "flags")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "native-floor"))
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(PHASES):
        p.error(f"--skip: unknown phases {sorted(skip - set(PHASES))}")
    if ensure_h2load() is None:
        raise SystemExit("native_floor: h2load is missing (Debian: apt-get install nghttp2-client)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    binary = build()
    cfg = ModelConfig.load(ROOT / "configs" / "criteo_kaggle.yaml")
    pkg = packages(work, [args.dtype])[args.dtype]
    name = json.loads((pkg / "manifest.json").read_text())["name"]
    bodies = {"predict": request_pool(cfg, 1, 64), "oip": infer_pool(cfg, 1, 64, name)}
    common = {"bench": "native_floor", "cpus": os.cpu_count(), "workers": args.workers, "dtype": args.dtype}

    procs: list[subprocess.Popen] = []
    servers: dict[str, tuple[str, str, list[bytes], list[int]]] = {}  # name -> address, method, pool, pids
    try:
        if "python_echo" not in skip:
            proc, msg = start_announced(["benchmarks.gateway_load", "--echo-server"], work, what="echo server",
                                        timeout=60)
            procs.append(proc)
            servers["python_echo"] = (f"127.0.0.1:{msg['port']}", METHOD, bodies["predict"], [proc.pid])
        if "native_echo" not in skip:
            proc, port = start_binary([str(binary), "--echo"], work, 30)
            procs.append(proc)
            servers["native_echo"] = (f"127.0.0.1:{port}", METHOD, bodies["predict"], [proc.pid])
        if "native" not in skip:
            gw = launch_native(["--model", str(pkg), "--workers", str(args.workers), "--metrics-port", "-1",
                                *args.native_args.split()], workdir=work / "native")
            procs.append(gw.proc)
            emit({**common, "event": "scores_checked", "server": "native", **check_scores(gw.address, cfg, pkg)})
            servers["native"] = (gw.address, METHOD, bodies["predict"], proc_memory.tree(gw.pid))
        if "serve_triton" not in skip:
            gw = launch_triton(["--model", str(pkg), "--workers", str(args.workers), "--metrics-port", "-1"],
                               workdir=work / "serve-triton", timeout=600)
            procs.append(gw.proc)
            servers["serve_triton"] = (gw.address, OIP_METHOD, bodies["oip"], proc_memory.tree(gw.pid))
        figures: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(args.rounds):
            echo = {}
            for server, (address, method, pool, pids) in servers.items():
                frame = answer_frame_bytes(address, method, pool[0])
                for c in (64, 512):  # answered calls only (DATA bytes / one answer's frame): refusals are not
                    r = h2load_with_cpu(address, method, pool[0], c, args.seconds, work, pids, frame)
                    rec = {**common, "round": rnd, "server": server, "concurrency": c,
                           "requests_per_s": r.get("answered_per_s"), "refused": r.get("refused_estimated"),
                           "failed": r.get("failed"), "cpu_ms_per_request": r.get("cpu_s_per_1000"),
                           "cpu_ms_by_process": r.get("cpu_s_per_1000_by_process"), "loadavg": _load()}
                    if server == "python_echo":
                        echo[c] = rec
                    elif c in echo and rec["requests_per_s"] and rec["cpu_ms_per_request"]:
                        rec["vs_echo"] = round(rec["requests_per_s"] / echo[c]["requests_per_s"], 3)
                        rec["cpu_vs_echo"] = round(rec["cpu_ms_per_request"] / echo[c]["cpu_ms_per_request"], 3)
                    figures.setdefault((server, c), []).append(rec)
                    emit(rec)
        emit({**common, "summary": "medians over rounds", "rounds": args.rounds, **{
            f"{server}_c{c}": {k: statistics.median(r[k] for r in recs) for k in
                               ("requests_per_s", "cpu_ms_per_request", "vs_echo", "cpu_vs_echo")
                               if all(r.get(k) is not None for r in recs)}
            for (server, c), recs in figures.items()}})
        if "open" not in skip:
            run = Run(argparse.Namespace(seconds=args.seconds), work, set(), True, {}, {})
            for server in ("native", "serve_triton"):
                if server not in servers:
                    continue
                address, method, pool, pids = servers[server]
                peak = statistics.median(r["requests_per_s"] for r in figures[(server, 512)])
                for phase, rate in (("half", peak / 2), ("2x", peak * 2)):
                    r = rate_phase(run, address, method, pool, rate, pids)
                    probe, h2 = r["probe"], r["h2load"]
                    emit({**common, "server": server, "phase": f"open_{phase}", "max_per_s": peak,
                          "p99_ms": h2.get("p99_ms"), "goodput_vs_max": round(r.get("goodput_per_s", 0) / peak, 3),
                          "accepted_p99_ms": probe["p99_ms"] if probe["ok"] else None,
                          "refusals": probe["errors"], "refusal_ms_by_code": probe.get("reject_ms_by_code"), **r,
                          "loadavg": _load()})
    finally:
        stop_all(procs, 30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
