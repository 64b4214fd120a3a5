"""Credentials on every server's control plane (issue 11, item 1), on real processes on loopback.

For each server, every control-plane RPC without a credential is UNAUTHENTICATED, with a wrong one
PERMISSION_DENIED, with the right one it works; the data plane stays open. With mutual TLS a client
without a certificate, or with one from another CA, fails at the handshake; with the right one every
RPC works, data plane included. A token never appears in a server's log or /metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from coordinator.process import launch as launch_coordinator
from inference_gateway.client import GatewayClient, build_request
from inference_gateway.process import launch as launch_gateway
from protos import coordinator_pb2, embedding_shard_pb2
from protos.coordinator_client import CoordinatorClient
from protos.plan import assignment_from_dict
from protos.shard_client import ShardClient
from tests import prom
from tests.test_inference_package import TINY, two_versions
from trainer.data import SyntheticData

TABLES = [{"name": "t", "num_rows": 64, "dim": 8, "features": ["f"],
           "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.1}}]
TOKEN = "control-s3cret-7f3a9c"
PREDICT_TOKEN = "predict-s3cret-51be02"
AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def token_file(tmp_path: Path, token: str, name: str = "token") -> str:
    path = tmp_path / name
    path.write_text(token + "\n")
    return str(path)


# -- shard -----------------------------------------------------------------------------------------
def shard_control_calls(client: ShardClient) -> dict[str, Callable[[], object]]:
    """One call per control-plane RPC (arguments need not be valid: a refusal comes first)."""
    pb = embedding_shard_pb2
    return {
        "Checkpoint": lambda: client.checkpoint("refused", step=0),
        "Restore": lambda: client.restore("refused"),
        "ExportRows": lambda: list(client.export_rows(0, 0, 8)),
        "ImportRows": lambda: client.import_rows([pb.RowChunk(plan_version=0, table="t", slice=0)]),
        "Prepare": lambda: client.prepare(assignment_from_dict({"shard_id": 0, "plan_version": 1, "tables": TABLES})),
        "PullRows": lambda: client.pull_rows(pb.PullRowsRequest(plan_version=1, source_plan_version=0, row_end=8)),
        "Commit": lambda: client.commit(1, 0),
        "Abort": lambda: client.abort(1),
    }


def test_shard_control_plane_needs_the_token(shard_factory, tmp_path):
    proc, _ = shard_factory({"tables": TABLES, "shard_id": 0},
                            extra_args=["--token-file", token_file(tmp_path, TOKEN)])
    assert proc.announced["control_token"] is True
    anonymous = ShardClient(proc.address, timeout=20)
    wrong = ShardClient(proc.address, timeout=20, token="not-the-token")
    right = ShardClient(proc.address, timeout=20, token=TOKEN)
    try:
        for rpc, call in shard_control_calls(anonymous).items():
            assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED, rpc
        for rpc, call in shard_control_calls(wrong).items():
            assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED, rpc
        assert not (tmp_path / "refused").exists(), "a refused Checkpoint wrote nothing"

        # the data plane needs no token
        lengths, values = torch.tensor([1, 2]), torch.tensor([3, 4, 5])
        res = anonymous.lookup(["f"], 2, lengths, values, step=0)
        assert anonymous.update(res.handle, torch.ones(2, 8)).applied_step == 0
        assert anonymous.info().shard_id == 0

        # with the token every control-plane RPC works
        assert right.checkpoint("c1", step=0).bytes_written > 0
        assert (tmp_path / "c1" / "manifest.json").exists()
        assert right.restore("c1").step == 0
        chunks = list(right.export_rows(0, 0, 8))
        assert right.import_rows(chunks).rows == 8
        staged = assignment_from_dict({"shard_id": 0, "plan_version": 1, "tables": TABLES})
        right.prepare(staged)
        pulled = right.pull_rows(embedding_shard_pb2.PullRowsRequest(plan_version=1, source_plan_version=0,
                                                                     source_slice=0, row_start=0, row_end=64))
        assert pulled.rows == 64
        assert right.abort(1).dropped
        right.prepare(staged)
        assert right.commit(1, 0).plan_version == 1

        assert prom.value(proc.metrics_port, "rpc_rejected_total", method="/recsys.v1.EmbeddingShard/Checkpoint",
                          reason="UNAUTHENTICATED") == 1
        assert prom.value(proc.metrics_port, "rpc_rejected_total", reason="PERMISSION_DENIED") >= 1
        text = prom.text(proc.metrics_port)
        assert TOKEN not in text and "not-the-token" not in text
        log = proc.log_path.read_text() + (proc.workdir / "stdout.log").read_text()
        assert TOKEN not in log and "not-the-token" not in log
    finally:
        for c in (anonymous, wrong, right):
            c.close()


def test_shard_mutual_tls(shard_factory, certs, tmp_path):
    proc, _ = shard_factory({"tables": TABLES, "shard_id": 1},
                            extra_args=["--tls-cert", certs["cert"], "--tls-key", certs["key"],
                                        "--tls-client-ca", certs["ca"]])
    assert proc.announced["mtls"] is True
    with ShardClient(proc.address, tls_ca=certs["ca"], timeout=5) as no_cert:
        assert code_of(no_cert.info) == grpc.StatusCode.UNAVAILABLE  # refused at the handshake
    with ShardClient(proc.address, tls_ca=certs["ca"], timeout=5, tls_cert=certs["other_ca"],
                     tls_key=certs["other_key"]) as other:
        assert code_of(other.info) == grpc.StatusCode.UNAVAILABLE  # a certificate another CA signed
    with ShardClient(proc.address, tls_ca=certs["ca"], timeout=20, tls_cert=certs["cert"],
                     tls_key=certs["key"]) as client:
        assert client.info().shard_id == 1
        res = client.lookup(["f"], 1, torch.tensor([2]), torch.tensor([3, 4]), step=0)  # data plane
        assert client.update(res.handle, torch.ones(1, 8)).applied_step == 0
        assert client.checkpoint("m1", step=0).bytes_written > 0  # mTLS alone authenticates the control plane
        assert client.restore("m1").step == 0


# -- gateway ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return two_versions(tmp_path_factory.mktemp("model-store"), "fp32", "fp32")


def one_request():
    b = SyntheticData(TINY, seed=0, pooling_factor=2).batch(0, 1)
    return build_request(b.dense.numpy(), b.sparse.lengths.numpy(), b.sparse.values.numpy())


def gateway_control_calls(client: GatewayClient) -> dict[str, Callable[[], object]]:
    return {"LoadModel": lambda: client.load_model("v2"),
            "SetDefaultVersion": lambda: client.set_default_version("dlrm", 2),
            "UnloadModel": lambda: client.unload_model("dlrm", 1)}


def test_gateway_control_plane_and_predict_tokens(store, tmp_path):
    gw = launch_gateway(["--model-store", str(store), "--model", "v1",
                         "--token-file", token_file(tmp_path, TOKEN),
                         "--predict-token-file", token_file(tmp_path, PREDICT_TOKEN, "predict")],
                        workdir=tmp_path / "gw")
    try:
        anonymous, wrong = GatewayClient(gw.address), GatewayClient(gw.address, token="x", predict_token="y")
        right = GatewayClient(gw.address, token=TOKEN, predict_token=PREDICT_TOKEN)
        req = one_request()
        for rpc, call in gateway_control_calls(anonymous).items():
            assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED, rpc
        for rpc, call in gateway_control_calls(wrong).items():
            assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED, rpc
        assert code_of(lambda: anonymous.predict_request(req)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: wrong.predict_request(req)) == grpc.StatusCode.PERMISSION_DENIED
        assert [m.version for m in anonymous.list_models()] == [1], "refused calls changed nothing"
        assert right.predict_request(req).version == 1
        assert right.load_model("v2").version == 2
        assert right.set_default_version("dlrm", 2).is_default
        right.unload_model("dlrm", 1)
        assert right.predict_request(req).version == 2
        # the operator's commands carry the token too
        from inference_gateway.cli import main as gateway_main

        with pytest.raises(SystemExit, match="UNAUTHENTICATED"):
            gateway_main(["unload", "--address", gw.address, "--name", "dlrm", "--version", "2"])
        assert gateway_main(["load", "--address", gw.address, "--path", "v1", "--token-file",
                             token_file(tmp_path, TOKEN)]) == 0
        assert sorted(m.version for m in anonymous.list_models()) == [1, 2]
        assert prom.value(gw.metrics_port, "rpc_rejected_total", method="/recsys.v1.InferenceGateway/LoadModel",
                          reason="UNAUTHENTICATED") == 1
        text = prom.text(gw.metrics_port)
        for secret in (TOKEN, PREDICT_TOKEN):
            assert secret not in text and secret not in gw.log_text()
        for c in (anonymous, wrong, right):
            c.close()
    finally:
        gw.kill()


def test_gateway_predict_open_without_predict_token_and_mutual_tls(store, certs, tmp_path):
    gw = launch_gateway(["--model-store", str(store), "--model", "v1", "--tls-cert", certs["cert"],
                         "--tls-key", certs["key"], "--tls-client-ca", certs["ca"]], workdir=tmp_path / "gw")
    try:
        with GatewayClient(gw.address, tls_ca=certs["ca"]) as no_cert:
            assert code_of(no_cert.list_models) == grpc.StatusCode.UNAVAILABLE
        with GatewayClient(gw.address, tls_ca=certs["ca"], tls_cert=certs["other_ca"],
                           tls_key=certs["other_key"]) as other:
            assert code_of(lambda: other.predict_request(one_request(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
        with GatewayClient(gw.address, tls_ca=certs["ca"], tls_cert=certs["cert"], tls_key=certs["key"]) as client:
            assert client.predict_request(one_request()).version == 1  # Predict: no token configured, open
            assert client.load_model("v2").version == 2  # the certificate is the control-plane credential
    finally:
        gw.kill()


# -- coordinator -----------------------------------------------------------------------------------
def test_coordinator_admin_rpcs_need_the_token(tmp_path):
    coord = launch_coordinator([], workdir=tmp_path / "coord", token=TOKEN)
    pb = coordinator_pb2
    try:
        calls = {"ApplyPlan": lambda c: list(c.stub.ApplyPlan(pb.ApplyPlanRequest(author="t"), timeout=20,
                                                              metadata=c._auth or None)),
                 "Rollback": lambda c: list(c.stub.Rollback(pb.RollbackRequest(author="t"), timeout=20,
                                                            metadata=c._auth or None))}
        with CoordinatorClient(coord.address) as anonymous, \
                CoordinatorClient(coord.address, token="wrong") as wrong, \
                CoordinatorClient(coord.address, token=TOKEN) as right:
            for rpc, call in calls.items():
                assert code_of(lambda call=call: call(anonymous)) == grpc.StatusCode.UNAUTHENTICATED, rpc
                assert code_of(lambda call=call: call(wrong)) == grpc.StatusCode.PERMISSION_DENIED, rpc
                assert code_of(lambda call=call: call(right)) not in AUTH_CODES, rpc  # reaches the servicer
            assert isinstance(anonymous.members(), list)  # the data plane (ListMembers) stays open
        assert prom.value(coord.metrics_port, "rpc_rejected_total", method="/recsys.v1.Coordinator/ApplyPlan",
                          reason="UNAUTHENTICATED") == 1
        text = prom.text(coord.metrics_port)
        assert TOKEN not in text and TOKEN not in coord.log_tail(1 << 20) and "wrong" not in coord.log_tail(1 << 20)
    finally:
        coord.kill()


def test_coordinator_mutual_tls_and_a_member_registering_with_its_certificate(shard_factory, certs, tmp_path):
    tls = ["--tls-cert", certs["cert"], "--tls-key", certs["key"]]
    coord = launch_coordinator([*tls, "--tls-client-ca", certs["ca"]], workdir=tmp_path / "coord")
    address = f"localhost:{coord.port}"
    try:
        with CoordinatorClient(address, tls_ca=certs["ca"], timeout=5) as no_cert:
            assert code_of(no_cert.members) == grpc.StatusCode.UNAVAILABLE
        with CoordinatorClient(address, tls_ca=certs["ca"], tls_cert=certs["other_ca"], tls_key=certs["other_key"],
                               timeout=5) as other:
            assert code_of(other.members) == grpc.StatusCode.UNAVAILABLE
        # a shard registers and heartbeats (data plane) presenting its own certificate
        shard_factory({"tables": TABLES, "shard_id": 0, "coordinator": address, "tls_ca": certs["ca"]},
                      extra_args=[*tls, "--tls-client-ca", certs["ca"]])
        with CoordinatorClient(address, tls_ca=certs["ca"], tls_cert=certs["cert"], tls_key=certs["key"]) as client:
            alive = client.wait_shards([0], wait_s=60)
            assert 0 in alive
    finally:
        coord.kill()


# -- members presenting the token: a rollout with every shard's control plane locked -----------------
def test_rollout_with_locked_shards_the_coordinator_and_peers_present_the_token(tmp_path, monkeypatch):
    from protos.coordinator_client import final
    from tests.coordinated import PLAN2, Job

    monkeypatch.setenv("RECSYS_CONTROL_TOKEN", TOKEN)  # shards require it; coordinator and shards present it
    job = Job(tmp_path)
    try:
        shard0 = job.shards.procs[0]
        assert shard0.announced["control_token"] is True
        with ShardClient(shard0.address, timeout=10) as anonymous:
            assert code_of(lambda: anonymous.abort(2)) == grpc.StatusCode.UNAUTHENTICATED
        p = final(job.client.apply(PLAN2, base_version=1, author="test", reason="locked shards"))
        assert p.phase == coordinator_pb2.DONE, p.message  # Prepare / PullRows -> peers' ExportRows / Commit
        assert job.client.get_plan()[0].plan.num_shards == 3
        for proc in job.shards.procs.values():
            assert TOKEN not in proc.log_path.read_text()
    finally:
        job.close()


def test_trainer_presents_the_token_for_its_checkpoints(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from embedding_service.process import launch
    from protos.plan import dump_plan
    from tests.test_trainer_pipeline import PLAN, shard_config

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "plan.json").write_text(dump_plan(PLAN))
    tok = token_file(tmp_path, TOKEN)
    shards = [launch({**shard_config(s), "token_file": tok}, workdir=tmp_path / f"s{s}") for s in range(2)]

    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "trainer.cli", "train", "--config", str(root / "configs" / "tiny.yaml"),
             "--plan", str(tmp_path / "plan.json"), "--shards", ",".join(s.address for s in shards),
             "--steps", "4", "--batch-size", "32", "--checkpoint-every", "2", "--json", *extra],
            capture_output=True, text=True, timeout=300,
            env={k: v for k, v in dict(os.environ, PYTHONPATH=str(root)).items() if k != "RECSYS_CONTROL_TOKEN"})

    try:
        ok = train("--checkpoint-dir", str(tmp_path / "ckpt"), "--token-file", tok)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert json.loads(ok.stdout.splitlines()[-1])["event"] == "done"
        assert (tmp_path / "ckpt" / "LATEST").read_text().strip() == "step-3"
        assert (tmp_path / "ckpt" / "step-3" / "shard-1" / "manifest.json").exists()
        refused = train("--checkpoint-dir", str(tmp_path / "ckpt-anonymous"), "--first-step", "4")
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr, refused.stderr[-2000:]
        assert not (tmp_path / "ckpt-anonymous" / "LATEST").exists()
        assert TOKEN not in ok.stderr + ok.stdout + refused.stderr
    finally:
        for s in shards:
            s.kill()
