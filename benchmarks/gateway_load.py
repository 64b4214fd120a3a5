"""Load generator for both inference gateways on the Criteo-Kaggle model (JSON lines, one per result).

One run, side by side: `serve` (the pure-Python gateway) and `serve-triton` (tritonserver's C++ gRPC
frontend over our model in Python-backend workers), per table dtype (FP32, INT8, INT4):
  echo      the W1 ceiling of Python gRPC: a Predict that does no work, with both clients, and its CPU.
  inprocess the batched limit of the package's model in this process, batch 64 and 256, with 1 and 2
            scoring threads of one torch thread each: `serve`'s ServingModel; for serve-triton the workers'
            own BatchScorer (mapped table image, the batch's checks), W1 batch = 64 one-sample requests,
            W2 = one 256-sample request; for serve-native its workers' Worker.answer on serialized Predict
            requests (parsing, checks and answers included, as BatchScorer's limit includes its checks). The
            threads score 16 batches in turn, as many as the W2 pool sends
            (one batch scored again and again keeps its table rows in cache: ~4% more samples/s, median of
            10 alternating pairs, than the gateway's own samples can have).
  w1        one sample per request, closed loop at concurrency C, on the frontend's unary W1 method
            (serve: Predict; serve-triton: ModelInfer on its OIP port, single-hot `ids` form), with the
            project's Python async client AND h2load; CPU-seconds of every server process per 1,000
            answered requests (h2load run); ratios to the echo (vs_echo_python, vs_echo_h2load, cpu_vs_echo).
  max       h2load at --max-concurrency (512): the gateway's own W1 maximum (at 64 in flight a batching
            server is latency-bound: serve-triton answered ~1.9x its C=64 rate when offered more).
  half, overload  open loop at half and at twice the gateway's own maximum (the largest W1 figure;
            h2load's count answered calls only, estimated from DATA bytes), each with `cores`: the CPU the
            load generator (h2load + the probe) and the gateway's processes took per second of the phase.
            Each is run twice: h2load's connections ticking spread over its 10 ms (the figures), then all
            together (`aligned`, beside them); see "Why h2load" below.
  stream    W1 over PredictStream (serve-triton: its --predict-port).
  oip       serve: W1 over the Open Inference Protocol on the same port (serve-triton's W1 is OIP already).
  predict   serve-triton: W1 Predict through its --predict-port (serve's W1 is Predict already).
  w2        one user x 256 candidates per request (serve-triton: one ModelInfer of 256 samples), closed
            loop; samples/s against the in-process limit (vs_in_process_1t / _2t), with the Python client
            (~0.8 ms of client CPU a W2 call, a tenth of the 2 cores the in-process limit has to itself) and
            with h2load (a C client: what the gateway itself sustains), in --w2-rounds rounds, each after the
            2-thread limit is measured again (the figure is the median ratio: the limit alone swung 88-112k
            samples/s in one sitting); then an open loop at 2x of the median rate.
A final "targets" record says pass/fail for each of issue 12's targets, per frontend and dtype.
`--frontend serve-native` measures `inference-gateway serve-native` (a grpc++ frontend over Python batch
workers; Predict, PredictStream and OIP on one port) through the same phases.

Why h2load for the open loops. One Python asyncio client tops out near the Python echo ceiling (its own
loop is GIL-bound and shares the 2 cores with the server), so it cannot offer half, let alone twice, the
maximum of a gateway that beats the echo. h2load's rate mode (`--rps` per connection) offers the load,
from 10 connections of 102 streams opened 1 ms apart, whose 10 ms send ticks cover the interval (a burst
each millisecond; benchmarks.h2.Ticks), and then from 4 connections of 256 streams opened at once, whose
ticks coincide (100 bursts a second: h2load's default, and these phases' only run until 2026-12-05),
reported beside as `aligned`. A batching server's latency at half load is mostly the burst it is handed
(aligned, each of ~250 requests waits for one worker to score all of them), and its refusals at 2x wait
behind the burst's others in the frontend's loop. Each rate record's `h2load.sends` says how bursty the
sends were. The native probe (benchmarks/probe.cc, a grpc++ client compiled on first use) sends at a low
rate (<= 100/s) beside h2load and times each call from its schedule. h2load counts HTTP statuses, and
gRPC answers a refusal with HTTP 200 too (grpc-status in trailers): from h2load we get the
offered and completed rate, every request's latency from its own send (refused and answered mixed; a
connection with all its streams in flight stops sending, so a server that neither answers nor refuses caps
h2load's rate: `sent_per_s` and `sent_vs_max` say what was sent, `offered_per_s` what was asked) and the
answered count, estimated from DATA bytes (a refusal is trailers-only); not which
code refused, nor how fast. The probe gives those: accepted p50/p99, each refusal code and its latency.
(Until this probe a Python asyncio one did that; on cores saturated by h2load and the gateway its event loop
ran tens of ms late, which it counted as the gateway's.) Goodput = h2load's estimated answers + the probe's,
per second. W2's overload (tens of requests/s) needs no h2load: the native probe offers 2x alone. Without
h2load (`--skip h2load`, or not installed) the Python client offers every W1 rate. The probe needs g++ and
grpc++ (Debian packages, installed as root with apt-get when missing, as h2load is).

    python -m benchmarks.gateway_load [--frontend both|serve,serve-triton,serve-native] [--dtypes fp32,int8,int4]
        [--seconds 5] [--concurrency 64] [--skip echo,inprocess,w1,h2load,max,half,overload,stream,oip,predict,w2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from benchmarks.h2 import (
    Ticks,
    answered,
    cpu_seconds_since,
    cpu_ticks,
    ensure_h2load,
    h2load,
    h2load_with_cpu,
    rate_result,
    start_rate,
    steal_s,
)
from benchmarks.probe import Probe
from benchmarks.probe import binary as probe_binary
from benchmarks.probe import open_loop as probe_open_loop
from inference_gateway import proc_memory
from inference_gateway.client import build_request
from inference_gateway.loadgen import METHOD, OIP_METHOD, closed_loop, open_loop, stream_closed_loop
from inference_gateway.model import ServingModel
from inference_gateway.native.build import BuildError
from inference_gateway.process import GatewayProcess, launch, launch_native, launch_triton
from protos.model_config import ModelConfig
from protos.package import load_package
from protos.quantize import DenseQuantization
from trainer.export import ExportedModel, export_package, table_dtypes
from trainer.model import DenseDLRM

ROOT = Path(__file__).resolve().parent.parent
FRONTENDS = ("serve", "serve-triton")
PHASES = "echo,inprocess,w1,h2load,max,half,overload,stream,oip,predict,w2"
W2_POOL = 16  # distinct W2 requests sent in turn; the in-process limit scores as many distinct batches
PROBE_MAX_PER_S = 100.0  # the native probe beside h2load's rate mode


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


def packages(workdir: Path, dtypes: list[str], dense: str = "none") -> dict[str, Path]:
    """One package per table dtype; `dense` int8: the dense arch dynamically quantized too (the export's
    --dense-quantize), in packages of their own."""
    out, model = {}, None
    for q in dtypes:
        path = workdir / (f"criteo-{q}.pkg" if dense == "none" else f"criteo-{q}-dense{dense}.pkg")
        if not (path / "manifest.json").exists():
            model = model or criteo_model()
            export_package(model, path, dtypes=table_dtypes(model.config, q, []), overwrite=True,
                           dense_quantization=DenseQuantization(dense))
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


def infer_pool(cfg: ModelConfig, batch: int, count: int, model: str) -> list[bytes]:
    """The same samples as request_pool's, as serialized ModelInferRequests for `model` (single-hot: the
    `ids` form both gateways take)."""
    from inference_gateway.oip import infer_request  # package `inference` stubs: only where needed

    features = [f.name for f in cfg.features]
    return [infer_request(*samples(cfg, batch, i), features, model=model, request_id=str(i)).SerializeToString()
            for i in range(count)]


def in_process_rate(score: Callable[[], object], batch: int, seconds: float, threads: int) -> float:
    """Samples/s of `threads` Python threads each calling `score` (one batch a call) on one torch thread:
    the shape of both servers (serve: worker threads, serve-triton: worker processes, each one kernel
    thread), and the limit they approach. Not torch intra-op threads: on this shared 2-core box their
    OpenMP barriers stall whenever another job takes a core (measured 10x slower at load 4)."""
    torch.set_num_threads(1)
    for _ in range(5):
        score()
    counts = [0] * threads
    start = time.perf_counter()
    stop = start + seconds

    def loop(k: int) -> None:
        while time.perf_counter() < stop:
            score()
            counts[k] += 1

    pool = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) * batch / (time.perf_counter() - start)


def scorers(frontend: str, pkg: Path, cfg: ModelConfig, workdir: Path) -> dict[int, Callable[[], object]]:
    """batch -> one call scoring it the way the frontend's workers do."""
    out: dict[int, Callable[[], object]] = {}
    if frontend == "serve-native":  # its workers' own call: serialized requests in, serialized answers out
        from inference_gateway import shared_tables
        from inference_gateway.native.worker import PREDICT, Worker

        facts = shared_tables.prepare(pkg, workdir / "tables")
        worker = Worker({"models": [{"name": facts["name"], "version": facts["version"], "path": str(pkg),
                                     "image": facts["image"]}],
                         "defaults": {facts["name"]: facts["version"]}, "default_model": facts["name"]})
        w1 = request_pool(cfg, 1, 64 * W2_POOL)
        for b, bodies in ((64, [w1[i:i + 64] for i in range(0, len(w1), 64)]),
                          (256, [[r] for r in request_pool(cfg, 256, W2_POOL)])):
            items = [[(PREDICT, r) for r in batch] for batch in bodies]
            failed = [code for code, _ in worker.answer(items[0]) if code]
            if failed:  # a limit of fast refusals would flatter every ratio
                raise RuntimeError(f"serve-native's worker refused the benchmark's requests: codes {failed}")
            turn = itertools.cycle(items)
            out[b] = lambda it=turn: worker.answer(next(it))
        return out
    if frontend == "serve":
        model = ServingModel(load_package(pkg))
        for b in (64, 256):
            batches = itertools.cycle([tuple(torch.from_numpy(a) for a in samples(cfg, b, i)) for i in range(W2_POOL)])
            out[b] = lambda it=batches: model.scores(*next(it))
        return out
    from inference_gateway import shared_tables
    from inference_gateway.triton_model import BatchScorer

    image = shared_tables.prepare(pkg, workdir / "tables")["image"]
    scorer = BatchScorer(pkg, image, 256)
    nfeat = len(cfg.features)
    for b, per_request in ((64, 1), (256, 256)):  # W1: 64 requests of one sample; W2: one request of 256
        batches = []
        for k in range(W2_POOL):
            dense, _, values = samples(cfg, b, k)
            ids = np.ascontiguousarray(values.reshape(nfeat, b).T)
            batches.append([{"dense": dense[i:i + per_request], "ids": ids[i:i + per_request]}
                            for i in range(0, b, per_request)])
        turn = itertools.cycle(batches)
        out[b] = lambda it=turn: scorer.scores([scorer.decode_batch(next(it))])
    return out


def _load() -> float:
    """1-minute load average: other work on the machine shows up here (this box has 2 cores)."""
    return round(os.getloadavg()[0], 2)


async def _echo_server() -> None:
    """The same Predict method answering an empty response without any work: what Python gRPC alone
    sustains with this client on this machine (the ceiling any Python gateway's W1 can reach)."""
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


@dataclass
class Run:
    """What every phase needs: the knobs, the clients at hand, and the figures targets are judged on."""

    args: argparse.Namespace
    workdir: Path
    skip: set[str]
    has_h2load: bool
    echo: dict  # client -> requests_per_s, and "cpu_s_per_1000"
    figures: dict  # (frontend, dtype) -> {figure: value}

    @property
    def use_h2load(self) -> bool:
        return self.has_h2load and "h2load" not in self.skip


def w1_both(run: Run, base: dict, bench: str, address: str, method: str, pool: list[bytes], pids: list[int],
            max_bench: str | None = None) -> dict:
    """W1 closed loop at concurrency C with the Python client and with h2load (+ the servers' CPU); with
    `max_bench`, h2load again at --max-concurrency: the gateway's own maximum (a closed loop of 64 is
    latency-bound on a batching server). h2load's rates count answered calls only (DATA bytes)."""
    a = run.args
    out = {}
    r = asyncio.run(closed_loop(address, pool, a.concurrency, a.seconds, 1, method))
    out["python"] = r
    rec = {**base, "bench": bench, "client": "python", "method": method.rsplit("/", 1)[1],
           "concurrency": a.concurrency, **r}
    if run.echo.get("python"):
        rec["vs_echo_python"] = round(r["requests_per_s"] / run.echo["python"], 3)
    emit({**rec, "loadavg": _load()})
    if run.use_h2load:
        frame = answer_frame_bytes(address, method, pool[0])
        for key, c in (("h2load", a.concurrency), ("h2load_max", a.max_concurrency)):
            if key == "h2load_max" and (max_bench is None or "max" in run.skip):
                continue
            r = h2load_with_cpu(address, method, pool[0], c, a.seconds, run.workdir, pids, frame)
            out[key] = r
            rec = {**base, "bench": bench if key == "h2load" else max_bench, "client": "h2load",
                   "method": method.rsplit("/", 1)[1], "concurrency": c, **r}
            if run.echo.get("h2load") and "answered_per_s" in r:
                rec["vs_echo_h2load"] = round(r["answered_per_s"] / run.echo["h2load"], 3)
            if run.echo.get("cpu_s_per_1000") and "cpu_s_per_1000" in r:
                rec["cpu_vs_echo"] = round(r["cpu_s_per_1000"] / run.echo["cpu_s_per_1000"], 3)
            emit({**rec, "loadavg": _load()})
    return out


def answer_frame_bytes(address: str, method: str, request: bytes) -> int:
    """Size of one answered call's gRPC message frame (what h2load sees as DATA); retried while the
    server still refuses the backlog of a phase just ended."""
    with grpc.insecure_channel(address) as channel:
        for _ in range(40):
            try:
                return len(channel.unary_unary(method)(request, timeout=30)) + 5
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    grpc.StatusCode.UNAVAILABLE):
                    raise
                time.sleep(0.25)
    raise RuntimeError(f"{address}{method}: every call refused for 10 s")


def rate_phase(run: Run, address: str, method: str, pool: list[bytes], rate: float,
               pids: Sequence[int] = (), ticks: Ticks = Ticks.ALIGNED) -> dict:
    """Open loop at `rate` requests/s: h2load's rate mode plus the native probe beside it (module docstring),
    or the Python client alone without h2load. With h2load, `cores`: how the host's cores were shared over the
    phase, CPU-seconds per second of the load generator (h2load and the probe) and of the server's processes
    `pids` (in all, and by kind: cpu_ticks), and what the hypervisor stole (`steal`). They run on the same
    cores; at 2x overload the server's share goes to answers and to refusals, each of which costs a whole
    gRPC call."""
    a = run.args
    if not run.use_h2load:
        r = asyncio.run(open_loop(address, pool, rate, a.seconds, 1, method))
        return {"client": "python", "offered_per_s": round(rate, 1), "goodput_per_s": r["requests_per_s"],
                "python": r}
    probe_rate = min(PROBE_MAX_PER_S, rate / 10)
    frame = answer_frame_bytes(address, method, pool[0])
    t0, children, server, stolen = time.monotonic(), _children_cpu_s(), cpu_ticks(list(pids)), steal_s()
    proc, log = start_rate(address, method, pool[0], rate - probe_rate, a.seconds, run.workdir,
                           streams=getattr(a, "rate_streams", 256), ticks=ticks)
    try:
        seen = Probe.start(address, method, pool, probe_rate, a.seconds, 1).result()
    finally:
        h2 = rate_result(proc, log, a.seconds, frame)  # both generators are waited for: in RUSAGE_CHILDREN now
    wall = time.monotonic() - t0
    cores = {"generator": round((_children_cpu_s() - children) / wall, 2),
             "steal": round((steal_s() - stolen) / wall, 3)}
    if pids:
        by = {k: v / wall for k, v in cpu_seconds_since(server, list(pids)).items()}
        cores["server"] = round(sum(by.values()), 2)
        cores["server_by_process"] = {k: round(v, 2) for k, v in by.items()}
    out = {"client": "h2load+native_probe", "offered_per_s": round(rate, 1), "ticks": ticks.value, "h2load": h2,
           "probe": seen, "cores": cores}
    if "requests_per_s" in h2:  # what was sent: less than offered once h2load's streams are all in flight
        out["sent_per_s"] = round(h2["requests_per_s"] + seen.get("achieved_send_rate", 0.0), 1)
    if "ok_estimated" in h2:
        out["goodput_per_s"] = round(h2["ok_estimated"] / h2["seconds"] + seen["requests_per_s"], 1)
    return out


def _children_cpu_s() -> float:
    """CPU-seconds of this process's children that have exited and been waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _half_figures(r: dict, peak: float) -> dict:
    return {"p99_ms": r["h2load"].get("p99_ms") if "h2load" in r else r["python"]["p99_ms"]}


def _overload_figures(r: dict, peak: float) -> dict:
    py = r.get("probe", r.get("python"))
    out = {"accepted_p99_ms": py["p99_ms"] if py["ok"] else None, "refusal_p99_ms": py.get("reject_p99_ms")}
    if r.get("goodput_per_s") is not None:
        out["goodput_vs_max"] = round(r["goodput_per_s"] / peak, 3)
    if r.get("sent_per_s") is not None:
        out["sent_vs_max"] = round(r["sent_per_s"] / peak, 3)
    return out


# phase: (record, rate / maximum, its figures; each but sent_vs_max a target's `PHASE_NAME`)
OPEN_PHASES = {"half": ("W1_open_half_max", 0.5, _half_figures),
               "overload": ("W1_open_2x_overload", 2.0, _overload_figures)}


def open_phases(run: Run, base: dict, key: tuple[str, str], address: str, method: str, pool: list[bytes],
                peak: float, pids: Sequence[int] = ()) -> None:
    """W1 open loop at half the gateway's maximum (latency) and at twice it (overload), each with h2load's
    connections ticking spread over its 10 ms (the figures) and then all at once (`aligned` in the record,
    `PHASE_aligned_NAME` among the figures: 100 bursts a second, h2load's default and the figures until
    2026-12-05), see benchmarks.h2.Ticks."""
    fig = run.figures[key]
    for phase, (bench, scale, figures) in OPEN_PHASES.items():
        if phase in run.skip:
            continue
        r = rate_phase(run, address, method, pool, peak * scale, pids, Ticks.SPREAD)
        main = figures(r, peak)
        fig.update({f"{phase}_{k}": v for k, v in main.items() if k != "sent_vs_max"})
        rec = {**base, "bench": bench, "max_per_s": peak, **main, **r}
        if run.use_h2load:
            aligned = rate_phase(run, address, method, pool, peak * scale, pids, Ticks.ALIGNED)
            side = figures(aligned, peak)
            fig.update({f"{phase}_aligned_{k}": v for k, v in side.items() if k != "sent_vs_max"})
            rec["aligned"] = {**side, **aligned}
        emit({**rec, "loadavg": _load()})


def vs_in_process(samples_per_s: float, limits: dict[tuple[int, int], float]) -> dict[str, float]:
    """W2 samples/s against the in-process limits of batch 256 measured (vs_in_process_1t / _2t)."""
    return {f"vs_in_process_{t}t": round(samples_per_s / limits[256, t], 3) for t in (1, 2) if (256, t) in limits}


@dataclass
class Endpoints:
    """Where a frontend takes each workload: its unary W1 (method, pool), Predict/PredictStream, W2."""

    w1: tuple[str, str, list[bytes]]
    predict_address: str
    w2: tuple[str, str, list[bytes]]
    other_w1: tuple[str, str, str, list[bytes]] | None  # (phase, address, method, pool): serve's OIP, triton's Predict


def start_frontend(frontend: str, pkg: Path, q: str, run: Run, pools: dict) -> tuple[GatewayProcess, Endpoints]:
    a = run.args
    if frontend == "serve-native":
        gw = launch_native(["--model", str(pkg), "--metrics-port", "-1", *a.native_args.split()],
                           workdir=run.workdir / f"native-gw-{q}")
        return gw, Endpoints((gw.address, METHOD, pools["w1"]), gw.address, (gw.address, METHOD, pools["w2"]),
                             ("oip", gw.address, OIP_METHOD, pools["w1_oip"]))
    if frontend == "serve":
        gw = launch(["--model", str(pkg), "--metrics-port", "-1", *a.server_args.split()],
                    workdir=run.workdir / f"gw-{q}", timeout=300)
        return gw, Endpoints((gw.address, METHOD, pools["w1"]), gw.address, (gw.address, METHOD, pools["w2"]),
                             ("oip", gw.address, OIP_METHOD, pools["w1_oip"]))
    gw = launch_triton(["--model", str(pkg), "--metrics-port", "-1", *a.triton_args.split()],
                       workdir=run.workdir / f"triton-gw-{q}", timeout=600)
    predict = f"127.0.0.1:{gw.announced['predict_port']}"
    return gw, Endpoints((gw.address, OIP_METHOD, pools["w1_oip"]), predict, (gw.address, OIP_METHOD, pools["w2_oip"]),
                         ("predict", predict, METHOD, pools["w1"]))


def run_frontend(run: Run, frontend: str, q: str, pkg: Path, cfg: ModelConfig, pools: dict, common: dict) -> None:
    a, skip = run.args, run.skip
    meta = load_package(pkg, read_tables=False)
    base = {**common, "frontend": frontend, "dtype": q, "table_bytes": meta.table_bytes,
            "float32_table_bytes": sum(t["float32_bytes"] for t in meta.manifest["tables"]),
            "server_args": {"serve": a.server_args, "serve-native": a.native_args}.get(frontend, a.triton_args)}
    del meta
    fig = run.figures.setdefault((frontend, q), {})
    limits: dict[tuple[int, int], float] = {}
    if "inprocess" not in skip:
        score = scorers(frontend, pkg, cfg, run.workdir)
        for b, threads in ((64, 1), (64, 2), (256, 1), (256, 2)):
            limits[b, threads] = in_process_rate(score[b], b, a.seconds / 2, threads)
            scorer = {"serve-triton": "BatchScorer", "serve-native": "Worker.answer"}.get(frontend, "ServingModel")
            emit({**base, "bench": "in_process", "scorer": scorer, "batch": b, "threads": threads,
                  "samples_per_s": round(limits[b, threads], 1), "loadavg": _load()})
        w2_score = score[256] if "w2" not in skip else None  # measured again beside each W2 round
        del score
    else:
        w2_score = None
    gw, ep = start_frontend(frontend, pkg, q, run, pools)
    pids = proc_memory.tree(gw.pid)  # supervisor, tritonserver and its workers
    try:
        peak = None
        if "w1" not in skip:
            address, method, pool = ep.w1
            r = w1_both(run, base, "W1_closed", address, method, pool, pids, "W1_max")
            fig["w1_python_per_s"] = r["python"]["requests_per_s"]
            h2 = r.get("h2load", {})
            if "answered_per_s" in h2:
                fig["w1_h2load_per_s"] = h2["answered_per_s"]
                fig["cpu_s_per_1000"] = h2.get("cpu_s_per_1000")
            maxima = {"python": fig["w1_python_per_s"], "h2load": fig.get("w1_h2load_per_s", 0.0),
                      "h2load_max": r.get("h2load_max", {}).get("answered_per_s", 0.0)}
            who = max(maxima, key=maxima.__getitem__)
            peak = maxima[who]
            open_phases(run, {**base, "max_from": who}, (frontend, q), address, method, pool, peak, pids)
        if "stream" not in skip:
            depth = max(1, a.concurrency // a.streams)
            r = asyncio.run(stream_closed_loop(ep.predict_address, pools["w1"], a.streams, depth, a.seconds, 1))
            rec = {**base, "bench": "W1_stream_closed", "client": "python", "method": "PredictStream",
                   "concurrency": a.streams * depth, "streams": a.streams, **r}
            if run.echo.get("python"):
                rec["vs_echo_python"] = round(r["requests_per_s"] / run.echo["python"], 3)
            emit({**rec, "loadavg": _load()})
        if ep.other_w1 and ep.other_w1[0] not in skip:
            phase, address, method, pool = ep.other_w1
            w1_both(run, base, f"W1_{phase}_closed", address, method, pool, proc_memory.tree(gw.pid))
        if "w2" not in skip:
            address, method, pool = ep.w2
            frame = answer_frame_bytes(address, method, pool[0]) if run.use_h2load else 0
            ratios: dict[str, list[float]] = {"python": [], "h2load": []}
            rates = []
            for k in range(a.w2_rounds):
                if w2_score is not None:  # again each round, beside the gateway: the host's noise hits both
                    limits[256, 2] = in_process_rate(w2_score, 256, a.seconds / 2, 2)
                r = asyncio.run(closed_loop(address, pool, a.w2_concurrency, a.seconds, 256, method))
                rates.append(r["requests_per_s"])
                rec = {**base, "bench": "W2_closed", "client": "python", "method": method.rsplit("/", 1)[1],
                       "concurrency": a.w2_concurrency, "candidates": 256, "round": k,
                       "in_process_2t": round(limits.get((256, 2), 0.0), 1), **r}
                rec.update(vs_in_process(r["samples_per_s"], limits))
                if rec.get("vs_in_process_2t") is not None:
                    ratios["python"].append(rec["vs_in_process_2t"])
                emit({**rec, "loadavg": _load()})
                if run.use_h2load:
                    r2 = answered(h2load(address, method, pool[0], a.w2_concurrency, a.seconds, run.workdir), frame)
                    rec2 = {**base, "bench": "W2_closed", "client": "h2load", "method": method.rsplit("/", 1)[1],
                            "concurrency": a.w2_concurrency, "candidates": 256, "round": k, **r2}
                    if "answered_per_s" in r2:
                        rec2["samples_per_s"] = round(r2["answered_per_s"] * 256, 1)
                        rec2.update(vs_in_process(rec2["samples_per_s"], limits))
                        if rec2.get("vs_in_process_2t") is not None:
                            ratios["h2load"].append(rec2["vs_in_process_2t"])
                    emit({**rec2, "loadavg": _load()})
            medians = {c: round(statistics.median(v), 3) for c, v in ratios.items() if v}
            fig["w2_vs_in_process_2t"] = medians.get("python")
            fig["w2_h2load_vs_in_process_2t"] = medians.get("h2load")
            emit({**base, "bench": "W2_median", "rounds": a.w2_rounds, "vs_in_process_2t": medians,
                  "each": ratios})
            if "overload" not in skip:  # compute-bound overload: tens of requests/s, the native probe offers 2x
                peak2 = statistics.median(rates)
                stolen = steal_s()
                r = probe_open_loop(address, method, pool, peak2 * 2, a.seconds, 256)
                r["steal_s"] = round(steal_s() - stolen, 2)
                fig["w2_overload_goodput_vs_max"] = round(r["requests_per_s"] / peak2, 3)
                fig["w2_overload_accepted_p99_ms"] = r["p99_ms"] if r["ok"] else None
                fig["w2_overload_refusal_p99_ms"] = r.get("reject_p99_ms")
                emit({**base, "bench": "W2_open_2x_overload", "candidates": 256,
                      "max_per_s": peak2, **r, "goodput_vs_max": round(r["requests_per_s"] / peak2, 3),
                      "loadavg": _load()})
    finally:
        gw.terminate(timeout=120)


TARGETS = (  # figure, bound, "min" (figure >= bound) or "max" (figure <= bound)
    ("w1_vs_echo_python", 1.5, "min"), ("w1_vs_echo_h2load", 2.0, "min"), ("cpu_vs_echo", 1 / 3, "max"),
    ("half_p99_ms", 15.0, "max"), ("w2_vs_in_process_2t", 0.8, "min"),
    ("w2_h2load_vs_in_process_2t", 0.8, "min"), ("overload_goodput_vs_max", 0.9, "min"),
    ("overload_accepted_p99_ms", 50.0, "max"), ("overload_refusal_p99_ms", 5.0, "max"),
    ("w2_overload_goodput_vs_max", 0.9, "min"), ("w2_overload_accepted_p99_ms", 50.0, "max"),
    ("w2_overload_refusal_p99_ms", 5.0, "max"))


def targets(run: Run) -> dict:
    """Issue 12's targets per frontend and dtype: value, bound, pass (None: not measured in this run)."""
    out = {}
    for (frontend, q), fig in run.figures.items():
        fig = dict(fig)
        if run.echo.get("python") and "w1_python_per_s" in fig:
            fig["w1_vs_echo_python"] = round(fig["w1_python_per_s"] / run.echo["python"], 3)
        if run.echo.get("h2load") and "w1_h2load_per_s" in fig:
            fig["w1_vs_echo_h2load"] = round(fig["w1_h2load_per_s"] / run.echo["h2load"], 3)
        if run.echo.get("cpu_s_per_1000") and fig.get("cpu_s_per_1000"):
            fig["cpu_vs_echo"] = round(fig["cpu_s_per_1000"] / run.echo["cpu_s_per_1000"], 3)
        res = {}
        for name, bound, kind in TARGETS:
            v = fig.get(name)
            ok = None if v is None else (v >= bound if kind == "min" else v <= bound)
            res[name] = {"value": v, ("min" if kind == "min" else "max"): round(bound, 3), "pass": ok}
            phase, _, rest = name.partition("_")
            if (v := fig.get(side := f"{phase}_aligned_{rest}")) is not None:  # beside the target: benchmarks.h2.Ticks
                res[side] = {"value": v, ("min" if kind == "min" else "max"): round(bound, 3),
                             "pass": v >= bound if kind == "min" else v <= bound, "target": False}
        out[f"{frontend}/{q}"] = res
    return out


def measure_echo(run: Run, pool: list[bytes], base: dict) -> None:
    from protos.process import start_announced

    proc, msg = start_announced(["benchmarks.gateway_load", "--echo-server"], run.workdir, what="echo server",
                                timeout=60)
    try:
        r = w1_both(run, {**base, "frontend": "python_echo"}, "W1_echo_ceiling", f"127.0.0.1:{msg['port']}",
                    METHOD, pool, [proc.pid])
    finally:
        proc.kill()
        proc.wait(10)
    run.echo["python"] = r["python"]["requests_per_s"]
    h2 = r.get("h2load", {})
    run.echo["h2load"] = h2.get("answered_per_s")
    run.echo["cpu_s_per_1000"] = h2.get("cpu_s_per_1000")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frontend", default="both", help="comma-separated, measured in this order: serve, serve-triton, "
                   "serve-native; both: serve,serve-triton")
    p.add_argument("--dtypes", default="fp32,int8,int4")
    p.add_argument("--dense-quantize", choices=("none", "int8"), default="none", help="also quantize the dense "
                   "arch (dynamic int8 Linear layers, as `trainer export --dense-quantize int8`)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64, help="W1 closed-loop clients")
    p.add_argument("--max-concurrency", type=int, default=512, help="W1 h2load streams for the gateway's maximum")
    p.add_argument("--w2-concurrency", type=int, default=4, help="W2 closed-loop clients")
    p.add_argument("--w2-rounds", type=int, default=5, help="W2 rounds, each with the in-process limit measured "
                   "again just before it (the figure is the median ratio: one sitting's limit swings ~10%%)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gateway-bench"))
    p.add_argument("--rate-streams", type=int, default=256, help="h2load's streams per connection (4 connections) "
                   "in the open loops: once all are in flight it sends no more, whatever the rate asked (sent_per_s "
                   "says what it sent); serve-native bounds them at 256 itself (--max-streams-per-connection)")
    p.add_argument("--streams", type=int, default=8, help="W1 over PredictStream: streams x depth = concurrency")
    p.add_argument("--server-args", default="--max-batch-size 256 --max-wait-ms 2 --workers 2 --max-queue 2048 "
                   "--max-concurrent-rpcs 128 --max-pending-rpcs 128 --max-queue-wait-ms 30",
                   help="extra `inference-gateway serve` flags")
    p.add_argument("--triton-args", default="--workers 2 --max-batch-size 256",
                   help="extra `inference-gateway serve-triton` flags (its default has no queue bound; add "
                   "--max-queue-wait-ms 30 for its refusals, at the cost `serve-triton --help` gives)")
    p.add_argument("--native-args", default="--workers 2 --max-queue-wait-ms 20",
                   help="extra `inference-gateway serve-native` flags")
    p.add_argument("--skip", default="", help=f"comma-separated phases to skip: {PHASES}")
    p.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo_server:
        asyncio.run(_echo_server())
        return 0
    if args.w2_rounds < 1:
        p.error("--w2-rounds: must be >= 1")
    skip = set(filter(None, args.skip.split(",")))
    unknown = skip - set(PHASES.split(","))
    if unknown:
        p.error(f"--skip: unknown phases {sorted(unknown)} (phases: {PHASES})")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dtypes = args.dtypes.split(",")
    frontends = FRONTENDS if args.frontend == "both" else tuple(args.frontend.split(","))
    if set(frontends) - {*FRONTENDS, "serve-native"}:
        p.error(f"--frontend: unknown {sorted(set(frontends) - {*FRONTENDS, 'serve-native'})} (serve, serve-triton, "
                "serve-native)")
    pkgs = packages(workdir, dtypes, args.dense_quantize)
    cfg = ModelConfig.load(ROOT / "configs" / "criteo_kaggle.yaml")
    name = json.loads((pkgs[dtypes[0]] / "manifest.json").read_text())["name"]
    pools = {"w1": request_pool(cfg, 1, 512), "w2": request_pool(cfg, 256, W2_POOL),
             "w1_oip": infer_pool(cfg, 1, 512, name), "w2_oip": infer_pool(cfg, 256, W2_POOL, name)}
    if not {"half", "overload"} <= skip:
        try:  # the open loops' probe: refused now, naming what to install, not after the first phases
            probe_binary()
        except BuildError as e:
            raise SystemExit(f"gateway_load: the native probe cannot be built: {e}") from None
    run = Run(args, workdir, skip, ensure_h2load() is not None, {}, {})
    common = {"model": "criteo_kaggle", "cpus": os.cpu_count(), "h2load": run.use_h2load,
              "dense_quantization": args.dense_quantize}
    if "echo" not in skip:
        measure_echo(run, pools["w1"], common)
    for q in dtypes:
        for frontend in frontends:
            run_frontend(run, frontend, q, pkgs[q], cfg, pools, common)
    emit({**common, "bench": "targets", "echo": run.echo, "targets": targets(run),
          "memory": "measured by benchmarks.gateway_frontend", "loadavg": _load()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
