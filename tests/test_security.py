"""TLS on a real shard process and bearer tokens on a real gRPC server (generated Coordinator service)."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

from embedding_service.config import ServerConfig
from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.channels import open_channel
from protos.security import BearerTokenInterceptor, TlsConfig, bearer_metadata, bind
from protos.shard_client import ShardClient

TABLES = [{"name": "t", "num_rows": 64, "dim": 8, "features": ["f"],
           "optimizer": {"type": "exact_sgd", "learning_rate": 0.1}}]
APPLY = "/recsys.v1.Coordinator/ApplyPlan"
STATUS = "/recsys.v1.Coordinator/RolloutStatus"
TOKEN = "s3cret-admin-token"


def test_shard_serves_tls_only(shard_factory, certs):
    proc, _ = shard_factory({"tables": TABLES, "shard_id": 3},
                            extra_args=["--tls-cert", certs["cert"], "--tls-key", certs["key"]])
    with ShardClient(proc.address, tls_ca=certs["ca"], timeout=20) as tls_client:
        info = tls_client.info()
        assert info.shard_id == 3 and info.slices[0].slice.table == "t"
    with ShardClient(proc.address, timeout=3) as plain, pytest.raises(grpc.RpcError) as e:
        plain.info()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with ShardClient(proc.address, tls_ca=certs["other_ca"], timeout=3) as untrusted, \
            pytest.raises(grpc.RpcError) as e:
        untrusted.info()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, "a server the CA did not sign is not trusted"


def test_tls_config_needs_both_paths(certs, tmp_path):
    with pytest.raises(ValueError, match="tls_key: required when tls_cert is given"):
        ServerConfig(tls_cert=certs["cert"])
    with pytest.raises(ValueError, match="tls_cert: required when tls_key is given"):
        ServerConfig(tls_key=certs["key"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(OSError, match=r"tls cert '.*missing\.pem'"):
        bind(server, "127.0.0.1:0", TlsConfig(str(tmp_path / "missing.pem"), certs["key"]))


class _Coordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Implements only the two RPCs the test calls: one unary and open, one streaming and protected."""

    def RolloutStatus(self, request, context):
        return coordinator_pb2.RolloutProgress(phase=coordinator_pb2.IDLE)

    def ApplyPlan(self, request, context):
        for phase in (coordinator_pb2.VALIDATING, coordinator_pb2.DONE):
            yield coordinator_pb2.RolloutProgress(rollout_id="r-1", phase=phase, to_version=2)


@pytest.fixture(scope="module")
def coordinator_address(certs):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[BearerTokenInterceptor(TOKEN, {APPLY})])
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(_Coordinator(), server)
    port = bind(server, "127.0.0.1:0", TlsConfig(certs["cert"], certs["key"]))
    server.start()
    yield f"localhost:{port}"
    server.stop(None)


@pytest.fixture
def stub(coordinator_address, certs):
    channel = open_channel(coordinator_address, tls_ca=certs["ca"])
    yield coordinator_pb2_grpc.CoordinatorStub(channel)
    channel.close()


def _apply(stub, metadata=None) -> list[int]:
    return [p.phase for p in stub.ApplyPlan(coordinator_pb2.ApplyPlanRequest(author="a"), metadata=metadata,
                                            timeout=10)]


def test_protected_method_without_token_is_unauthenticated(stub):
    with pytest.raises(grpc.RpcError) as e:
        _apply(stub)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == f"missing bearer token for {APPLY}"
    with pytest.raises(grpc.RpcError) as e:
        _apply(stub, metadata=(("authorization", f"Basic {TOKEN}"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, "only the Bearer scheme counts"


def test_protected_method_with_wrong_token_is_denied(stub):
    for wrong in ("nope", TOKEN[:-1], TOKEN + "x"):
        with pytest.raises(grpc.RpcError) as e:
            _apply(stub, metadata=bearer_metadata(wrong))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == f"wrong bearer token for {APPLY}"


def test_right_token_passes_and_open_methods_need_none(stub):
    assert _apply(stub, metadata=bearer_metadata(TOKEN)) == [coordinator_pb2.VALIDATING, coordinator_pb2.DONE]
    assert stub.RolloutStatus(coordinator_pb2.RolloutStatusRequest(), timeout=10).phase == coordinator_pb2.IDLE


def test_interceptor_refuses_bad_configuration():
    with pytest.raises(ValueError, match="token: empty"):
        BearerTokenInterceptor("", {APPLY})
    with pytest.raises(ValueError, match="protected: 'ApplyPlan' is not a full method name"):
        BearerTokenInterceptor(TOKEN, {"ApplyPlan"})


def test_coordinator_and_its_members_speak_tls(certs, tmp_path):
    """The real coordinator over TLS: a TLS client and a TLS shard member work, a plaintext client fails."""
    from coordinator.process import launch as launch_coordinator
    from embedding_service.process import launch as launch_shard
    from protos.coordinator_client import CoordinatorClient
    from protos.plan import shard_config

    coord = launch_coordinator(["--tls-cert", certs["cert"], "--tls-key", certs["key"]], workdir=tmp_path / "c")
    shard = None
    try:
        assert coord.announced["tls"] is True
        shard = launch_shard(shard_config(None, 0, coordinator=coord.address, num_trainers=1, tls_ca=certs["cert"]),
                             workdir=tmp_path / "s")
        with CoordinatorClient(coord.address, tls_ca=certs["cert"]) as c:
            deadline = time.monotonic() + 30
            while not [m for m in c.members() if m.kind == coordinator_pb2.SHARD]:
                assert time.monotonic() < deadline, "the TLS shard did not register"
                time.sleep(0.1)
        with CoordinatorClient(coord.address, timeout=3) as plain, pytest.raises(grpc.RpcError) as e:
            plain.members()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if shard is not None:
            shard.kill()
        coord.kill()
