"""The CPU floor of tritonserver's Python backend: what one W1 request costs when the model does no work.

serve-triton misses issue 12's "CPU per W1 request <= 1/3 of the Python echo's" target; this says how much
of that is the model and how much the frontend. It runs tritonserver (the same binary, backend, jemalloc,
request pool, and serve-triton's own config.pbtxt of its defaults: inputs, batcher, queue policy) over a
Python-backend model that is sent serve-triton's single-hot inputs (`dense`, `ids`) and answers zeros the
way our worker answers scores (DLPack in and out, one response per request), then drives it with h2load
at 64 and 512 streams, and prints the CPU-seconds per 1,000 answered requests of tritonserver and its
stubs. Same run: the Python gRPC echo (gateway_load's) for the ratio.

    python -m benchmarks.triton_floor [--seconds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import grpc

from benchmarks.gateway_load import _load, emit, infer_pool, request_pool
from benchmarks.h2 import ensure_h2load, h2load_with_cpu
from inference_gateway import proc_memory
from inference_gateway.loadgen import METHOD, OIP_METHOD
from inference_gateway.triton_frontend import (
    POOL_CAP,
    Allocator,
    FrontendConfig,
    TritonDist,
    Version,
    config_pbtxt,
    preload,
)
from protos.model_config import ModelConfig
from protos.process import free_port, start_announced

ROOT = Path(__file__).resolve().parents[1]

NOOP_MODEL = '''
from torch.utils.dlpack import from_dlpack, to_dlpack
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:  # inputs in and scores out as triton_model's worker takes and answers them
            arrays = {t.name(): from_dlpack(t.to_dlpack()).numpy() for t in r.inputs()}
            scores = torch.zeros(arrays["dense"].shape[0], 1)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("scores", to_dlpack(scores))]))
        return out
'''


def write_repository(root: Path, cfg: ModelConfig, workers: int) -> None:
    """The no-op model under serve-triton's own config.pbtxt (inputs, batcher, queue policy of its defaults)."""
    model = root / "noop"
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "1" / "model.py").write_text(NOOP_MODEL)
    facts = {"name": "noop", "version": 1, "features": [f.name for f in cfg.features],
             "dense_features": cfg.dense_features}
    (model / "config.pbtxt").write_text(config_pbtxt(Version(facts), FrontendConfig(workers=workers)))


def start(dist: TritonDist, work: Path, port: int) -> subprocess.Popen:
    from protos import open_inference_pb2 as oip
    from protos import open_inference_pb2_grpc as oip_grpc

    args = [*dist.command(work / "repository", work, "127.0.0.1", port, POOL_CAP), "--allow-metrics=false"]
    log = open(work / "tritonserver.log", "ab")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(args, env=dist.env(preload(Allocator.AUTO)), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tritonserver exited {proc.returncode}; see {work / 'tritonserver.log'}")
        try:
            if stub.ModelReady(oip.ModelReadyRequest(name="noop"), timeout=5).ready:
                return proc
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit("tritonserver: the no-op model was not ready within 120 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2, help="Python-backend instances (serve-triton's --workers)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "triton-floor"))
    args = p.parse_args(argv)
    if ensure_h2load() is None:
        raise SystemExit("triton_floor: h2load is missing (Debian: apt-get install nghttp2-client)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.load(ROOT / "configs" / "criteo_kaggle.yaml")
    body = infer_pool(cfg, 1, 1, "noop")[0]
    common = {"bench": "triton_floor", "cpus": os.cpu_count(), "workers": args.workers}

    echo, msg = start_announced(["benchmarks.gateway_load", "--echo-server"], work, what="echo server",
                                timeout=60)
    try:  # gateway_load's echo ceiling: a Predict that does no work, one Python gRPC process
        r = h2load_with_cpu(f"127.0.0.1:{msg['port']}", METHOD, request_pool(cfg, 1, 1)[0], 64, args.seconds,
                            work, [echo.pid])
        echo_cpu = r.get("cpu_s_per_1000")
        emit({**common, "server": "python_echo", "concurrency": 64, **r, "loadavg": _load()})
    finally:
        echo.kill()
        echo.wait(10)
    write_repository(work / "repository", cfg, args.workers)
    port = free_port()
    proc = start(TritonDist.find(), work, port)
    try:
        pids = proc_memory.tree(proc.pid)
        for c in (64, 512):
            r = h2load_with_cpu(f"127.0.0.1:{port}", OIP_METHOD, body, c, args.seconds, work, pids)
            rec = {**common, "server": "tritonserver+noop", "concurrency": c, **r, "loadavg": _load()}
            if echo_cpu and r.get("cpu_s_per_1000"):
                rec["cpu_vs_echo"] = round(r["cpu_s_per_1000"] / echo_cpu, 3)
            emit(rec)
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps({"bench": "done"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
