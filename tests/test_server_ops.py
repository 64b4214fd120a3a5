"""Operating a shard: health, reflection, Prometheus metrics, CLI, SIGTERM drain, refused configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests import prom

ROOT = Path(__file__).resolve().parent.parent
TABLES = [{"name": "t", "num_rows": 64, "dim": 8, "features": ["f"],
           "optimizer": {"type": "exact_sgd", "learning_rate": 0.1}}]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "embedding_service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_health_reflection_metrics_and_info(shard_factory):
    proc, client = shard_factory({"tables": TABLES})
    assert client.health() == health_pb2.HealthCheckResponse.SERVING
    assert client.health("recsys.v1.EmbeddingShard") == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"recsys.v1.EmbeddingShard", "grpc.health.v1.Health"} <= names

    res = client.lookup(["f"], 4, torch.tensor([1, 2, 0, 3]), torch.tensor([1, 2, 3, 4, 5, 6]), step=0)
    client.update(res.handle, torch.ones(4, 8))
    with pytest.raises(grpc.RpcError):
        client.lookup(["nope"], 1, torch.tensor([0]), torch.tensor([], dtype=torch.int64), step=1)
    expected = [(1, "shard_requests_total", {"code": "OK", "method": "Lookup"}),
                (1, "shard_requests_total", {"code": "INVALID_ARGUMENT", "method": "Lookup"}),
                (6, "shard_rows_looked_up_total", {}), (6, "shard_rows_updated_total", {}),
                (1, "shard_request_seconds_count", {"method": "Update"}), (2048, "shard_weight_bytes", {}),
                (1, "shard_compute_seconds_count", {"phase": "forward"}),
                (1, "shard_compute_seconds_count", {"phase": "backward"})]
    for want, name, labels in expected:
        assert prom.value(proc.metrics_port, name, **labels) == want, (name, labels)

    out = run_cli("info", proc.address, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["weight_bytes"] == "2048" and info["lookups"] == "1" and info["slices"][0]["slice"]["table"] == "t"
    text = run_cli("info", proc.address)
    assert "EXACT_SGD" in text.stdout and "applied step 0" in text.stdout


def test_sigterm_drains_and_exits_zero(shard_factory):
    config = {"mode": "sync", "num_trainers": 2, "tables": TABLES}
    proc, client = shard_factory(config)
    ok = client.lookup(["f"], 1, torch.tensor([1]), torch.tensor([3]), no_grad=True)
    assert ok.embeddings.shape == (1, 8)
    # trainer 0's lookup blocks waiting for trainer 1; the drain fails it cleanly instead of hanging
    blocked = client.lookup_async(["f"], 1, torch.tensor([1]), torch.tensor([3]), trainer_id=0, step=0)
    time.sleep(0.5)
    t0 = time.monotonic()
    assert proc.terminate(timeout=30) == 0
    assert time.monotonic() - t0 < 15
    with pytest.raises(grpc.RpcError) as e:
        blocked.result(10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopped" in proc.log_tail()


def test_sigterm_lets_in_flight_compute_finish(shard_factory):
    big = [{"name": "t", "num_rows": 200_000, "dim": 64, "features": ["f"],
            "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.1}}]
    proc, client = shard_factory({"tables": big})
    n = 2_000_000
    results = {}

    def call() -> None:
        try:
            results["ok"] = client.lookup(["f"], 4096, torch.full((4096,), n // 4096),
                                          torch.randint(0, 200_000, (n // 4096 * 4096,)), no_grad=True)
        except grpc.RpcError as e:
            results["err"] = e

    th = threading.Thread(target=call)
    th.start()
    time.sleep(0.3)  # the 16 MB request is being received or computed
    assert proc.terminate(timeout=60) == 0
    th.join(30)
    assert "ok" in results, results.get("err")
    assert results["ok"].embeddings.shape == (4096, 64)


def test_cpu_refuses_cuda_only_optimizers_at_start(tmp_path):
    cfg = tmp_path / "shard.yaml"
    cfg.write_text("tables:\n  - {name: t, num_rows: 10, dim: 4, features: [f], optimizer: {type: adam}}\n")
    out = run_cli("serve", "--config", str(cfg))
    assert out.returncode == 2
    assert "ADAM is not supported in CPU mode" in out.stderr and "'t'" in out.stderr


def test_serve_flags_and_help(tmp_path):
    out = run_cli("serve", "--help")
    assert out.returncode == 0 and "--num-trainers" in out.stdout and "sync" in out.stdout
    out = run_cli("serve")
    assert out.returncode != 0 and "no tables" in out.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("tables:\n  - {name: t, num_rows: 10, dim: 4, features: [f]}\n"
                   "slices:\n  - {table: t, row_offset: 5, num_rows: 10, col_offset: 0, num_cols: 4}\n")
    out = run_cli("serve", "--config", str(cfg))
    assert out.returncode == 2 and "slice 0 of table 't'" in out.stderr and "[5, 15)" in out.stderr
