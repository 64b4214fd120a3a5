"""Fenced stale members (issue 11, item 3), with real processes on loopback: a shard frozen past its lease
(SIGSTOP) and replaced is refused when it wakes (SIGCONT) and applies no write; a trainer of an earlier
incarnation is refused by the coordinator and by the shards."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
import torch

from coordinator.process import launch as launch_coordinator
from embedding_service.process import launch as launch_shard
from protos import coordinator_pb2 as pb
from protos.coordinator_client import CoordinatorClient
from protos.member_agent import Fenced, MemberAgent
from protos.shard_client import ShardClient

TABLES = [{"name": "users", "num_rows": 100, "dim": 8, "features": ["user"],
           "optimizer": {"type": "exact_sgd", "learning_rate": 0.5}}]
LENGTHS, VALUES = torch.tensor([2, 1]), torch.tensor([3, 4, 5])


@pytest.fixture
def coordinator(tmp_path):
    proc = launch_coordinator(["--lease-s", "1"], workdir=tmp_path / "coordinator")
    client = CoordinatorClient(proc.address)
    yield proc, client
    client.close()
    proc.kill()


def shard_member(client: CoordinatorClient, shard: int) -> pb.Member | None:
    return next((m for m in client.members() if m.kind == pb.SHARD and m.id == shard), None)


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_frozen_shard_replaced_then_woken_is_fenced(coordinator, tmp_path):
    coord, client = coordinator
    config = {"shard_id": 0, "seed": 1, "tables": TABLES, "coordinator": coord.address}
    old = launch_shard(config, workdir=tmp_path / "old")
    new = None
    old_client = ShardClient(old.address)
    try:
        first = wait_for(lambda: shard_member(client, 0), "shard 0 to register")
        assert first.epoch >= 1 and first.address == old.address
        before = old_client.lookup_rows("users", torch.arange(100))
        handle = old_client.lookup(["user"], 2, LENGTHS, VALUES, step=0).handle  # its update comes after the wake

        os.kill(old.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: shard_member(client, 0).state == pb.DEAD, "the frozen shard to miss its lease")
            new = launch_shard(config, workdir=tmp_path / "new")
            replaced = wait_for(lambda: (m := shard_member(client, 0)) is not None and m.address == new.address
                                and m.state == pb.ALIVE and m, "the replacement to register")
            assert replaced.epoch > first.epoch
            # sent while the old shard is frozen: it is the first thing the woken shard sees
            pending = old_client.update_async(handle, torch.ones(2, 8))
        finally:
            os.kill(old.pid, signal.SIGCONT)

        with pytest.raises(grpc.RpcError) as err:
            pending.result(timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        epochs = f"epoch {first.epoch} was superseded by epoch {replaced.epoch}"
        assert "Update: shard 0" in err.value.details() and epochs in err.value.details()
        torch.testing.assert_close(old_client.lookup_rows("users", torch.arange(100)), before, atol=0, rtol=0)

        with pytest.raises(grpc.RpcError) as err:  # and no later write either
            old_client.lookup(["user"], 2, LENGTHS, VALUES, step=1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and epochs in err.value.details()

        deadline = time.monotonic() + 3.0  # several of the old shard's heartbeat intervals (lease 1 s)
        while time.monotonic() < deadline:
            m = shard_member(client, 0)
            assert (m.address, m.epoch, m.state) == (new.address, replaced.epoch, pb.ALIVE), \
                "the fenced shard was counted alive again"
            time.sleep(0.1)
        assert old.proc.poll() is None, "a fenced shard keeps serving reads (its rows can still be exported)"
        log = old.log_tail(20000)
        assert epochs in log, log
        with ShardClient(new.address) as c:  # the replacement writes normally
            h = c.lookup(["user"], 2, LENGTHS, VALUES, step=0).handle
            assert c.update(h, torch.ones(2, 8)).applied_step == 0
    finally:
        old_client.close()
        old.kill()
        if new is not None:
            new.kill()


def test_trainer_of_an_earlier_incarnation_is_refused(coordinator):
    coord, client = coordinator
    state = lambda: (0, 0)  # noqa: E731
    first = MemberAgent(coord.address, pb.Member(kind=pb.TRAINER, id=0), state).start(wait_s=30)
    second = None
    try:
        epoch = first.epoch
        first._stop.set()  # the first incarnation stops heartbeating (frozen) past its lease
        first._thread.join(timeout=5)
        time.sleep(1.3)
        second = MemberAgent(coord.address, pb.Member(kind=pb.TRAINER, id=0), state).start(wait_s=30)
        assert second.epoch > epoch
        with pytest.raises(Fenced, match=f"trainer 0: epoch {epoch} was superseded by epoch {second.epoch}"):
            first.check()  # its lease lapsed: it asks the coordinator, which refuses its epoch
        assert first.fenced.is_set()
        second.check()  # the current incarnation is fine
        trainers = [m for m in client.members() if m.kind == pb.TRAINER]
        # one record, the second incarnation's (ListMembers never shows an instance: it is the member's secret)
        assert [(m.instance, m.epoch) for m in trainers] == [("", second.epoch)]
        # a raw heartbeat with the old epoch names both epochs
        with pytest.raises(grpc.RpcError) as err:
            first.stub.Heartbeat(pb.HeartbeatRequest(kind=pb.TRAINER, id=0, instance=first.member.instance,
                                                     epoch=epoch), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"epoch {epoch} was superseded by epoch {second.epoch}" in err.value.details()
        # an old client without epochs is served as before
        assert first.stub.Heartbeat(pb.HeartbeatRequest(kind=pb.TRAINER, id=0, instance=second.member.instance),
                                    timeout=5).known
    finally:
        first.stop(leave=False)
        if second is not None:
            second.stop()


def test_shard_refuses_writes_of_an_earlier_trainer_epoch(shard_factory):
    _, client = shard_factory({"tables": TABLES, "mode": "async", "num_trainers": 1})
    before = client.lookup_rows("users", torch.arange(100))
    old_handle = client.lookup(["user"], 2, LENGTHS, VALUES, step=0).handle  # epoch 0: accepted as before
    client.trainer_epoch = 9
    with pytest.raises(grpc.RpcError) as err:  # bad input: refused, and its epoch is not recorded
        client.lookup(["user"], 2, LENGTHS, torch.tensor([3, 4, 500]), step=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client.trainer_epoch = 3
    client.lookup(["user"], 2, LENGTHS, VALUES, step=0)
    client.trainer_epoch = 2
    for call in (lambda: client.lookup(["user"], 2, LENGTHS, VALUES, step=1),
                 lambda: client.update(old_handle, torch.ones(2, 8))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "trainer_epoch: trainer 0 epoch 2 was superseded by epoch 3" in err.value.details()
    torch.testing.assert_close(client.lookup_rows("users", torch.arange(100)), before, atol=0, rtol=0)


def test_writes_go_on_while_the_coordinator_is_down(tmp_path):
    """Fencing must not turn a dead coordinator into a stopped job: past the lease, a member asks once,
    gets no answer, and writes go on (the agent keeps trying in the background)."""
    coord = launch_coordinator(["--lease-s", "1"], workdir=tmp_path / "coordinator")
    agent = MemberAgent(coord.address, pb.Member(kind=pb.TRAINER, id=0), lambda: (0, 0)).start(wait_s=30)
    try:
        coord.kill()
        coord.proc.wait(10)
        time.sleep(1.5)  # the lease lapsed; the agent's heartbeats now fail
        start = time.monotonic()
        for _ in range(20):
            agent.check()
            time.sleep(0.05)
        assert time.monotonic() - start < 5.0 and not agent.fenced.is_set()
    finally:
        agent.stop(leave=False)
        coord.kill()


def test_trainer_woken_after_its_replacement_stops(tmp_path):
    """A trainer process frozen past its lease while a new incarnation of its rank registered: when it
    wakes, the coordinator refuses its heartbeats and it stops before its next write, naming the epochs."""
    from tests.coordinated import Job

    job = Job(tmp_path, "--lease-s", "1", standby=0)
    new = None
    try:
        trainers = job.train(100000)
        job.wait_step(2)
        old = next(m for m in job.client.members() if m.kind == pb.TRAINER and m.id == 0)
        pid = trainers.procs[0].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: next(m for m in job.client.members() if m.kind == pb.TRAINER and m.id == 0).state
                     == pb.DEAD, "the frozen trainer to miss its lease")
            new = MemberAgent(job.coordinator.address, pb.Member(kind=pb.TRAINER, id=0), lambda: (1, 0)).start(30)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert new.epoch > old.epoch
        assert trainers.procs[0].wait(60) != 0
        err = (tmp_path / "trainers-1" / "rank0.err").read_text()
        assert f"trainer 0: epoch {old.epoch} was superseded by epoch {new.epoch}" in err, err[-3000:]
        assert "Traceback" not in err.split("trainer 0: epoch")[-1], "a clear error at exit"
        current = [m for m in job.client.members() if m.kind == pb.TRAINER and m.id == 0]
        assert [m.epoch for m in current] == [new.epoch]  # the replacement's record (instances are never listed)
    finally:
        if new is not None:
            new.stop()
        job.close()
