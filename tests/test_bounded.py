"""Bounded under load (issue 11, item 7): a real shard in async mode serving many trainers that look up
without updating keeps its pending handles and in-flight lookups bounded: past the bound RESOURCE_EXHAUSTED
names it, and nothing changes."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from embedding_service.cli import build_parser
from protos import embedding_shard_pb2
from tests import prom

TABLES = [{"name": "users", "num_rows": 100, "dim": 8, "features": ["user"],
           "optimizer": {"type": "exact_sgd", "learning_rate": 0.5}}]
LENGTHS, VALUES = torch.tensor([2, 1]), torch.tensor([3, 4, 5])


def lookup(client, trainer: int, step: int):
    return client.lookup(["user"], 2, LENGTHS, VALUES, trainer_id=trainer, step=step)


def info(client) -> embedding_shard_pb2.InfoResponse:
    return client.stub.Info(embedding_shard_pb2.InfoRequest(), timeout=10)


def test_pending_handles_bounded(shard_factory):
    _, client = shard_factory({"tables": TABLES, "mode": "async", "num_trainers": 8, "staleness": 1000,
                               "max_pending_handles": 12})
    before = client.lookup_rows("users", torch.arange(100))
    handles = [lookup(client, t, s).handle for s in range(3) for t in range(4)]  # 12 lookups, no update
    for attempt in range(50):  # many more trainers and steps: every one refused, nothing held or computed
        with pytest.raises(grpc.RpcError) as err:
            lookup(client, 4 + attempt % 4, attempt)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_pending_handles: 12 lookup handles already await their update (bound 12)" in err.value.details()
    assert info(client).lookups == 12
    torch.testing.assert_close(client.lookup_rows("users", torch.arange(100)), before, atol=0, rtol=0)
    assert client.lookup(["user"], 2, LENGTHS, VALUES, no_grad=True).handle == ""  # evaluation holds nothing
    client.update(handles[0], torch.ones(2, 8))  # an update frees its handle: the next lookup fits
    lookup(client, 5, 0)
    with pytest.raises(grpc.RpcError) as err:
        lookup(client, 6, 0)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_inflight_lookups_bounded(shard_factory):
    proc, client = shard_factory({"tables": TABLES, "mode": "async", "num_trainers": 4, "staleness": 0,
                                  "max_inflight_lookups": 2})
    first = lookup(client, 0, 0)
    # trainer 0's lookups of step 1 wait for its update of step 0: two of them fill the bound
    waiting = [client.lookup_async(["user"], 2, LENGTHS, VALUES, trainer_id=0, step=1) for _ in range(2)]
    deadline = time.monotonic() + 30
    while prom.value(proc.metrics_port, "shard_inflight_lookups") < 2:
        assert time.monotonic() < deadline, "the lookups did not reach the shard"
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as err:
        lookup(client, 1, 0)  # another trainer, not waiting on anything: refused for load
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_inflight_lookups: 2 Lookup requests already in flight (bound 2)" in err.value.details()
    assert info(client).lookups == 1
    client.update(first.handle, torch.ones(2, 8))  # Updates are never refused for load: they drain the queue
    for f in waiting:
        assert f.result(timeout=30).handle
    lookup(client, 1, 0)


def test_bounds_have_flags_with_help():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    for flag in ("--max-pending-handles", "--max-inflight-lookups", "--max-concurrent-rpcs"):
        assert flag in text
    assert "RESOURCE_EXHAUSTED" in text


def test_bounds_validated():
    from embedding_service.config import ShardConfig

    for key in ("max_pending_handles", "max_inflight_lookups"):
        with pytest.raises(ValueError, match=f"{key}: must be >= 1, got 0"):
            ShardConfig.from_dict({"tables": TABLES, key: 0})


def test_grpc_admits_at_most_max_concurrent_rpcs(shard_factory):
    """Past the RPCs the shard admits, gRPC itself refuses: no queue grows without bound."""
    proc, client = shard_factory({"tables": TABLES, "mode": "async", "num_trainers": 2, "staleness": 0,
                                  "wait_timeout_s": 3, "server": {"max_concurrent_rpcs": 3}})
    lookup(client, 0, 0)
    # three lookups of step 1 wait (at most wait_timeout_s) for trainer 0's update of step 0
    waiting = [client.lookup_async(["user"], 2, LENGTHS, VALUES, trainer_id=0, step=1) for _ in range(3)]
    deadline = time.monotonic() + 30
    while prom.value(proc.metrics_port, "shard_inflight_lookups") < 3:
        assert time.monotonic() < deadline, "the lookups did not reach the shard"
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as err:
        info(client)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for f in waiting:
        with pytest.raises(grpc.RpcError) as err:
            f.result(timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "timed out after 3s" in err.value.details()
    assert info(client).lookups == 1  # admitted again once they ended
