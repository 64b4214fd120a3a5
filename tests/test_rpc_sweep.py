"""Every RPC of every server, tried as an attacker who can reach the port would (issue 11): without a
credential, with undecodable bytes, and with an empty request. Services and methods are enumerated by
asking each running server (gRPC reflection), so an RPC or service added later is swept too, and must be
classified as data or control plane.

What each call must answer:
- a control-plane RPC without a token: UNAUTHENTICATED, before anything is decoded or done;
- undecodable bytes (with the token): INVALID_ARGUMENT, never UNKNOWN or INTERNAL (UNIMPLEMENTED when a
  valid request is UNIMPLEMENTED too: a method this port does not serve);
- an empty request (with the token): a precise status or OK, never UNKNOWN or INTERNAL;
and afterwards the server still answers its health check SERVING. The table of answers is printed
(`pytest -s tests/test_rpc_sweep.py`) for the closing note.

serve-triton is swept on both its ports: the management port like any server of ours, and
tritonserver's own port (C++ code we configure, not write), which has no reflection: its methods come
from the service descriptor tritonclient bundles, and every method changing or revealing server state
must refuse a caller without the supervisor's secret (Triton answers UNAVAILABLE "This protocol is
restricted", not UNAUTHENTICATED) and leave the served model as it was.
"""

from __future__ import annotations

import contextlib
import os
import signal

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.grpc import InferenceServerClient
from tritonclient.grpc import service_pb2 as triton_pb2

from coordinator.process import launch as launch_coordinator
from coordinator.server import ADMIN_METHODS
from embedding_service.servicer import CONTROL_PLANE as SHARD_CONTROL
from inference_gateway.control_plane import CONTROL_PLANE as GATEWAY_CONTROL
from inference_gateway.process import launch as launch_gateway
from inference_gateway.process import launch_triton
from inference_gateway.triton_frontend import RESTRICTED
from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.security import bearer_metadata
from tests.test_credentials import TABLES, TOKEN, token_file
from tests.test_inference_package import TINY, tiny_model
from trainer.export import export_package, table_dtypes

GARBAGE = b"\xff\xff\xff\xff\x0f"  # not a protobuf message: a truncated varint field
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# Data plane by design (issue 11): reads, the training path, membership; every other RPC is control plane.
DATA_PLANE = {
    "recsys.v1.EmbeddingShard": {"Lookup", "Update", "LookupRows", "Info"},
    "recsys.v1.InferenceGateway": {"Predict", "PredictStream", "ListModels"},
    "recsys.v1.Coordinator": {"Register", "Heartbeat", "ListMembers", "Leave", "GetPlan", "WatchPlan",
                              "ReportFenced", "PlanHistory", "ValidatePlan", "RolloutStatus"},
    # the Open Inference Protocol (KServe v2): readiness, metadata and inference, no state changes
    "inference.GRPCInferenceService": {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                                       "ModelInfer"},
}
# tritonserver's protocol groups serve-triton restricts to its supervisor (triton_frontend.RESTRICTED), by method
TRITON_RESTRICTED = {
    "model-repository": {"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"},
    "shared-memory": {"SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
                      "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister"},
    "statistics": {"ModelStatistics"},
    "trace": {"TraceSetting"},
    "logging": {"LogSettings"},
}
# open on tritonserver's port: the protocol's data plane plus Triton's streaming inference and model config
TRITON_OPEN = DATA_PLANE["inference.GRPCInferenceService"] | {"ModelStreamInfer", "ModelConfig"}
INFRASTRUCTURE = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                  "grpc.reflection.v1.ServerReflection"}


def control_plane(service: str) -> set[str]:
    if service == "recsys.v1.EmbeddingShard":
        return set(SHARD_CONTROL)
    if service == "recsys.v1.InferenceGateway":
        return set(GATEWAY_CONTROL)
    if service == "recsys.v1.Coordinator":
        return {m.rsplit("/", 1)[1] for m in ADMIN_METHODS}
    return set()


def served_services(channel: grpc.Channel) -> list:
    """The descriptors of every service the server exposes (by reflection), gRPC's own ones aside."""
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(database)
    names = [n for n in database.get_services() if n not in INFRASTRUCTURE]
    assert names, "reflection lists no service"
    return [pool.FindServiceByName(n) for n in names]


def invoke(channel: grpc.Channel, service: str, method, payload: bytes, token: str | None) -> grpc.StatusCode:
    """Sends raw `payload` as the request of `method` (any streaming shape); returns the status."""
    path = f"/{service}/{method.name}"
    kw = {"request_serializer": None, "response_deserializer": None}
    md = bearer_metadata(token) if token else None
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path, **kw)(iter([payload]), timeout=20, metadata=md))
        elif method.client_streaming:
            channel.stream_unary(path, **kw)(iter([payload]), timeout=20, metadata=md)
        elif method.server_streaming:
            call = channel.unary_stream(path, **kw)(payload, timeout=20, metadata=md)
            next(iter(call), None)  # a watch stream may never end: its first answer is enough
            call.cancel()
        else:
            channel.unary_unary(path, **kw)(payload, timeout=20, metadata=md)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def sweep(address: str, token: str, expect: set[str]) -> None:
    """Every method of every service the server at `address` exposes; `expect`: the services it must have."""
    with grpc.insecure_channel(address) as channel:
        services = served_services(channel)
        assert {d.full_name for d in services} == expect, [d.full_name for d in services]
        for descriptor in services:
            sweep_service(channel, descriptor, token)


def sweep_service(channel: grpc.Channel, descriptor, token: str) -> None:
    """(method, plane, no token, undecodable, empty) for every method of the service, printed; then checked."""
    service = descriptor.full_name
    control = control_plane(service)
    methods = list(descriptor.methods)
    unclassified = [m.name for m in methods if m.name not in control and m.name not in DATA_PLANE[service]]
    assert not unclassified, f"{service}: classify {unclassified} as data or control plane"
    rows, wrong = [], []
    for m in methods:
        plane = "control" if m.name in control else "data"
        anonymous = invoke(channel, service, m, b"", None)
        undecodable = invoke(channel, service, m, GARBAGE, token)
        empty = invoke(channel, service, m, b"", token)
        rows.append((m.name, plane, anonymous.name, undecodable.name, empty.name))
        # not served on this port (serve-triton: Predict on its management port, LoadModel on its predict port)
        not_served = empty == anonymous == grpc.StatusCode.UNIMPLEMENTED
        if plane == "control" and anonymous != grpc.StatusCode.UNAUTHENTICATED and not not_served:
            wrong.append(f"{m.name} without a token: {anonymous.name}")
        if undecodable != grpc.StatusCode.INVALID_ARGUMENT and not (not_served and undecodable == empty):
            wrong.append(f"{m.name} undecodable: {undecodable.name}")
        wrong += [f"{m.name} {what}: {code.name}" for what, code in (("empty", empty), ("no token", anonymous))
                  if code in NEVER]
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    show(service, rows)
    assert not wrong, wrong


def show(server: str, rows: list[tuple[str, str, str, str, str]]) -> None:
    print(f"\n{server}: method | plane | no token | undecodable | empty request")
    for row in rows:
        print("  " + " | ".join(row))


def test_every_shard_rpc(shard_factory, tmp_path):
    proc, _ = shard_factory({"tables": TABLES, "shard_id": 0}, extra_args=["--token-file", token_file(tmp_path, TOKEN)])
    sweep(proc.address, TOKEN, {"recsys.v1.EmbeddingShard"})
    assert not any(p.name not in ("metrics", "log") for p in proc.workdir.iterdir() if p.is_dir()), \
        "a refused or empty request wrote a directory"


@pytest.fixture
def gateway(tmp_path):
    store = tmp_path / "store"
    export_package(tiny_model(0), store / "v1", dtypes=table_dtypes(TINY, "fp32", []), version=1)
    gw = launch_gateway(["--model-store", str(store), "--model", "v1", "--token-file", token_file(tmp_path, TOKEN)],
                        workdir=tmp_path / "gw")
    yield gw
    gw.kill()


def test_every_gateway_rpc(gateway):
    sweep(gateway.address, TOKEN, {"recsys.v1.InferenceGateway", "inference.GRPCInferenceService"})


@pytest.fixture
def triton_gateway(tmp_path):
    store = tmp_path / "store"
    export_package(tiny_model(0), store / "v1", dtypes=table_dtypes(TINY, "fp32", []), version=1)
    g = launch_triton(["--model-store", str(store), "--model", "v1", "--workers", "1",
                       "--token-file", token_file(tmp_path, TOKEN)], workdir=tmp_path / "gw")
    yield g
    g.kill()
    with contextlib.suppress(ProcessLookupError):
        os.kill(g.announced["triton_pid"], signal.SIGKILL)


def triton_call(channel: grpc.Channel, method, payload: bytes) -> tuple[str, str]:
    """(status, details) of `payload` sent raw, without any credential, to a method of tritonserver's
    service; ModelStreamInfer answers in the stream, so its first message's error counts as its answer (a
    message Triton cannot parse gets none: the stream just ends)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming:
            answers = list(channel.stream_stream(path)(iter([payload]), timeout=20))
            errors = [triton_pb2.ModelStreamInferResponse.FromString(a).error_message for a in answers]
            if not answers:
                return "OK, no answer in stream", ""
            return ("OK", "") if not any(errors) else ("OK, error in stream", errors[0])
        channel.unary_unary(path)(payload, timeout=20)
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    return "OK", ""


def sweep_triton(address: str) -> None:
    """Every method of tritonserver's GRPCInferenceService, anonymous, empty and undecodable; printed, then
    checked: each restricted method refuses both, no method answers undecodable bytes OK, and the model
    still serves its one version afterwards (nothing was loaded, unloaded or replaced)."""
    assert set(TRITON_RESTRICTED) == set(RESTRICTED)
    restricted = set().union(*TRITON_RESTRICTED.values())
    descriptor = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    unclassified = [m.name for m in descriptor.methods if m.name not in restricted | TRITON_OPEN]
    assert not unclassified, f"tritonserver: classify {unclassified} as open or restricted"
    rows, wrong = [], []
    with grpc.insecure_channel(address) as channel:
        for m in descriptor.methods:
            empty, undecodable = triton_call(channel, m, b""), triton_call(channel, m, GARBAGE)
            plane = "restricted" if m.name in restricted else "open"
            rows.append((m.name, plane, f"{empty[0]} {empty[1][:60]!r}", f"{undecodable[0]} {undecodable[1][:40]!r}",
                         "-"))
            if plane == "restricted" and (empty[0] != "UNAVAILABLE" or "protocol is restricted" not in empty[1]):
                wrong.append(f"{m.name} without the supervisor's secret: {empty}")
            if undecodable == ("OK", ""):
                wrong.append(f"{m.name} undecodable: OK")
    show(f"tritonserver {descriptor.full_name} (never with a credential)", rows)
    assert not wrong, wrong
    client = InferenceServerClient(address)
    assert client.is_server_ready() and client.is_model_ready("dlrm")
    assert client.get_model_metadata("dlrm").versions == ["1"]


def test_every_serve_triton_rpc(triton_gateway):
    """Every port of one serve-triton: management and predict (reflection), and tritonserver's."""
    sweep(f"127.0.0.1:{triton_gateway.announced['management_port']}", TOKEN, {"recsys.v1.InferenceGateway"})
    sweep(f"127.0.0.1:{triton_gateway.announced['predict_port']}", TOKEN, {"recsys.v1.InferenceGateway"})
    sweep_triton(triton_gateway.address)
    repository = triton_gateway.workdir / "triton" / "repository"
    assert sorted(p.name for p in repository.iterdir()) == ["dlrm"]  # no model was uploaded


def test_every_coordinator_rpc(tmp_path):
    coord = launch_coordinator([], workdir=tmp_path / "coord", token=TOKEN)
    try:
        sweep(coord.address, TOKEN, {"recsys.v1.Coordinator"})
    finally:
        coord.kill()



def test_listed_members_never_show_their_secret_so_no_one_else_can_make_them_leave(tmp_path):
    """A member's `instance` is its credential for Heartbeat and Leave: ListMembers (open to anyone)
    never returns it, and a Leave without it removes nothing."""
    coord = launch_coordinator([], workdir=tmp_path / "coord", token=TOKEN)
    pb = coordinator_pb2
    try:
        with grpc.insecure_channel(coord.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            member = pb.Member(kind=pb.SHARD, id=3, address="127.0.0.1:1", instance="secret-instance-1f2e")
            stub.Register(pb.RegisterRequest(member=member), timeout=20)
            [listed] = stub.ListMembers(pb.ListMembersRequest(), timeout=20).members
            assert (listed.kind, listed.id, listed.instance) == (pb.SHARD, 3, "")
            for guess in ("", listed.instance, "secret-instance"):
                assert not stub.Leave(pb.LeaveRequest(kind=pb.SHARD, id=3, instance=guess), timeout=20).removed
            assert len(stub.ListMembers(pb.ListMembersRequest(), timeout=20).members) == 1
            assert stub.Leave(pb.LeaveRequest(kind=pb.SHARD, id=3, instance=member.instance), timeout=20).removed
            assert not stub.ListMembers(pb.ListMembersRequest(), timeout=20).members
    finally:
        coord.kill()
