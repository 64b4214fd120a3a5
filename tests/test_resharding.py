"""Shard-side re-sharding: Prepare a new plan beside the live one, pull rows shard-to-shard, Commit / Abort."""

from __future__ import annotations

import grpc
import pytest
import torch

from protos import common_pb2, embedding_shard_pb2
from protos.shard_client import ShardClient
from tests.test_state_transfer import TABLES, exported, snapshot, train

pb = embedding_shard_pb2


def assignment(version: int, shard: int, slices: list[tuple[str, int, int, int, int]]) -> common_pb2.ShardAssignment:
    """slices: (table, row_offset, num_rows, col_offset, num_cols)."""
    from protos.plan import assignment_from_dict

    names = {s[0] for s in slices}
    a = assignment_from_dict({"shard_id": shard, "plan_version": version,
                              "tables": [t for t in TABLES if t["name"] in names], "slices": []})
    for table, r0, nr, c0, nc in slices:
        a.slices.add(table=table, row_offset=r0, num_rows=nr, col_offset=c0, num_cols=nc,
                     sharding_type=common_pb2.ROW_WISE)
    return a


def test_rows_move_shard_to_shard_and_the_plan_flips(shard_factory):
    proc_a, a = shard_factory({"seed": 1, "plan_version": 1, "shard_id": 0, "tables": TABLES})
    proc_b, _ = shard_factory({"seed": 1, "plan_version": 0, "shard_id": 1, "tables": [], "slices": []})
    train(a, 4)
    before = snapshot(a)
    big_state = exported(a, 0, 0, 300)[1]
    b = ShardClient(proc_b.address, plan_version=0)
    # v2: shard 0 keeps big rows [0, 120) and small; shard 1 takes big rows [120, 300)
    a.prepare(assignment(2, 0, [("big", 0, 120, 0, 16), ("small", 0, 20, 0, 8)]))
    b.prepare(assignment(2, 1, [("big", 120, 180, 0, 16)]))
    assert a.info().staged_version == 2 and a.info().plan_version == 1
    r1 = a.pull_rows(pb.PullRowsRequest(plan_version=2, source="", source_plan_version=1, source_slice=0,
                                        row_start=0, row_end=120, dest_slice=0))
    a.pull_rows(pb.PullRowsRequest(plan_version=2, source_plan_version=1, source_slice=1, row_start=0, row_end=20,
                                   dest_slice=1))
    r2 = b.pull_rows(pb.PullRowsRequest(plan_version=2, source=proc_a.address, source_plan_version=1,
                                        source_slice=0, row_start=120, row_end=300, dest_slice=0, chunk_rows=50))
    assert (r1.rows, r2.rows, r2.chunks) == (120, 180, 4)
    assert r2.bytes == 180 * (16 * 4 + 4)  # weights + row-wise Adagrad state
    # the live plan still serves until the commit
    assert torch.equal(a.lookup_rows("big", torch.arange(300)), before["big"])
    a.commit(2, applied_step=3)
    b.commit(2, applied_step=3)
    a.plan_version = b.plan_version = 2
    got = torch.cat([a.lookup_rows("big", torch.arange(120)), b.lookup_rows("big", torch.arange(180))])
    assert torch.equal(got, before["big"])
    assert torch.equal(a.lookup_rows("small", torch.arange(20)), before["small"])
    state = torch.cat([exported(a, 0, 0, 120)[1], exported(b, 0, 0, 180)[1]])
    assert torch.equal(state, big_state)
    # the old version is refused now; training continues at step 4 under v2
    old = ShardClient(proc_a.address, plan_version=1)
    with pytest.raises(grpc.RpcError) as e:
        old.lookup_rows("big", torch.arange(3))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    res = b.lookup(["u"], 2, torch.tensor([1, 1]), torch.tensor([0, 5]), step=4)
    b.update(res.handle, torch.ones_like(res.embeddings))
    assert b.info().applied_step == 4
    for c in (b, old):
        c.close()


def test_abort_drops_the_staged_plan_and_bad_pulls_change_nothing(shard_factory):
    _, a = shard_factory({"seed": 1, "plan_version": 1, "shard_id": 0, "tables": TABLES})
    train(a, 2)
    before = snapshot(a)
    with pytest.raises(grpc.RpcError) as e:  # nothing staged
        a.pull_rows(pb.PullRowsRequest(plan_version=2, source_slice=0, row_start=0, row_end=5, dest_slice=0))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not staged" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # not newer than the live version
        a.prepare(assignment(1, 0, [("big", 0, 300, 0, 16)]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "plan_version" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # another shard's assignment
        a.prepare(assignment(2, 3, [("big", 0, 300, 0, 16)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shard_id" in e.value.details()
    a.prepare(assignment(2, 0, [("big", 0, 100, 0, 16)]))
    for bad, field in [(dict(row_start=0, row_end=200, dest_slice=0), "dest_row_start"),
                       (dict(row_start=0, row_end=10, dest_slice=4), "slice"),
                       (dict(row_start=0, row_end=10, dest_slice=0, src_col_start=10, num_cols=10), "num_cols"),
                       (dict(row_start=5, row_end=5, dest_slice=0), "row_end")]:
        with pytest.raises(grpc.RpcError) as e:
            a.pull_rows(pb.PullRowsRequest(plan_version=2, source_plan_version=1, source_slice=0, **bad))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details(), e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # an unreachable source fails the pull
        a.pull_rows(pb.PullRowsRequest(plan_version=2, source="127.0.0.1:1", source_plan_version=1, source_slice=0,
                                       row_start=0, row_end=10, dest_slice=0))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "127.0.0.1:1" in e.value.details()
    assert a.abort(2).dropped and a.info().staged_version == 0
    with pytest.raises(grpc.RpcError) as e:
        a.commit(2, applied_step=1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert a.info().plan_version == 1
    after = snapshot(a)
    assert all(torch.equal(before[k], after[k]) for k in before)
    train(a, 1, start_step=2)  # still serving the old plan
