"""WatchPlan streams have threads of their own: a fleet of trainers holding them never starves heartbeats,
and streams past --max-watchers are refused with RESOURCE_EXHAUSTED instead."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from coordinator.process import launch
from protos import coordinator_pb2 as pb
from protos.coordinator_client import CoordinatorClient


@pytest.fixture
def coordinator(request, tmp_path):
    c = launch(["--log-level", "WARNING", *getattr(request, "param", [])], workdir=tmp_path / "coordinator")
    yield c
    c.kill()


def _open_watches(client: CoordinatorClient, n: int) -> list:
    streams = [client.watch_plan(i) for i in range(n)]
    for s in streams:
        assert next(s).kind == pb.CURRENT  # the stream is open and holds its server thread
    return streams


def test_more_watchers_than_unary_threads_leave_heartbeats_answered(coordinator):
    with CoordinatorClient(coordinator.address, timeout=10) as client:
        streams = _open_watches(client, 80)  # more than the 64 threads unary RPCs get
        member = pb.Member(kind=pb.SHARD, id=0, address="127.0.0.1:1", instance=uuid.uuid4().hex)
        epoch = client.stub.Register(pb.RegisterRequest(member=member), timeout=10).epoch
        beat = client.stub.Heartbeat(pb.HeartbeatRequest(kind=pb.SHARD, id=0, instance=member.instance,
                                                         epoch=epoch), timeout=10)
        assert beat.known and [m.id for m in client.members()] == [0]
        for s in streams:
            s.cancel()


@pytest.mark.parametrize("coordinator", [["--max-watchers", "3"]], indirect=True)
def test_watchers_past_the_limit_are_refused_and_a_closed_one_frees_its_slot(coordinator):
    with CoordinatorClient(coordinator.address, timeout=10) as client:
        streams = _open_watches(client, 3)
        with pytest.raises(grpc.RpcError) as e:
            next(client.watch_plan(9))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_watchers" in e.value.details()
        streams[0].cancel()
        for _ in range(100):  # the server notices the cancellation within its poll period
            try:
                assert next(client.watch_plan(9)).kind == pb.CURRENT
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(0.1)
        else:
            pytest.fail("a cancelled WatchPlan stream never gave its slot back")
