"""Live re-sharding through the coordinator with real shards, trainers and Redis: the model after a
rollout (and a rollback) equals the model trained without one; a shard killed mid-rollout aborts it
and nothing is lost; a shard killed during training is recovered from the last checkpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from coordinator.recovery import JobResult, JobSupervisor
from protos import coordinator_pb2, failpoints
from protos.coordinator_client import final
from tests.coordinated import PLAN1, PLAN2, assert_equals_reference

pb = coordinator_pb2



def test_rollout_2_to_3_shards_then_rollback_equals_training_without(job_factory):
    steps = 400
    job = job_factory()
    job.train(steps)
    job.wait_step(40)
    p = final(job.client.apply(PLAN2, base_version=1, author="test", reason="2 -> 3 shards, items row-wise"))
    assert p.phase == pb.DONE, p.message
    assert (p.from_version, p.to_version) == (1, 2)
    assert p.rows_done == 200 + 500 + 40 + 24  # every row copied: 397 between shards, 367 locally
    assert p.bytes_done == p.bytes_total == 23520  # what `coordinator plan diff` predicts
    assert 40 <= p.fence_step < steps - 1 and p.pause_s > 0
    assert job.client.get_plan()[0].plan.num_shards == 3
    job.wait_step(p.fence_step + 30)
    back = final(job.client.rollback(author="test"))
    assert back.phase == pb.DONE, back.message
    assert (back.from_version, back.to_version) == (2, 3) and p.fence_step < back.fence_step < steps - 1
    job.wait_trainers()
    assert not [m for m in job.client.members() if m.kind == pb.TRAINER]  # finished trainers left at once
    assert_equals_reference(job, steps)
    history = job.client.history()
    assert history.current_version == 3
    assert [r.plan.version for r in history.records] == [3, 2, 1]
    assert [r.parent_version for r in history.records] == [2, 1, 0]
    assert history.records[0].reason == "rollback to version 1" and history.records[1].author == "test"
    # a shard under the new plan holds the new slices; shard 2 holds nothing again after the rollback
    members = {m.id: m for m in job.client.members() if m.kind == pb.SHARD}
    assert all(m.plan_version == 3 for m in members.values())


def test_shard_killed_mid_rollout_aborts_and_training_continues_on_the_old_plan(job_factory):
    steps = 240
    job = job_factory("--rate-limit-mbps", "0.01", "--rows-per-pull", "8")
    job.train(steps)
    job.wait_step(20)
    aborted = None
    for p in job.client.apply(PLAN2, base_version=1, author="test", reason="doomed"):
        if p.phase == pb.MIGRATING and p.rows_done > 0 and 2 in job.shards.procs:
            job.shards.procs.pop(2).kill()  # kill -9 the shard that was receiving rows
        aborted = p
    assert aborted.phase == pb.ABORTED, aborted
    assert "migration failed" in aborted.message or "shard 2" in aborted.message, aborted.message
    assert aborted.fence_step < steps - 1
    record, _ = job.client.get_plan()
    assert record.plan.version == 1  # the old plan stays current and complete
    job.wait_trainers()
    assert_equals_reference(job, steps)
    assert [r.plan.version for r in job.client.history().records] == [1]


def supervised(job, ckpt, steps: int, fault: Callable[[threading.Thread], None]) -> JobResult:
    """Trains `steps` steps under a JobSupervisor (checkpoints every 40 steps in `ckpt`), with `fault(runner)`
    called from here while the supervisor runs in `runner`; the supervisor's result."""
    trainers = job.train(steps, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "40", start=False)
    supervisor = JobSupervisor(job.client, job.shards, trainers, checkpoint_dir=ckpt, poll_s=0.1)
    result = {}
    runner = threading.Thread(target=lambda: result.update(r=supervisor.run()))
    runner.start()
    try:
        fault(runner)
        runner.join(timeout=300)
        assert not runner.is_alive()
    finally:
        supervisor.stop()
        runner.join(timeout=30)
    assert "r" in result, "the supervisor failed (its exception is in the warnings above)"
    return result["r"]


def test_shard_killed_during_training_recovers_from_the_checkpoint(job_factory, tmp_path):
    steps = 300
    job = job_factory(standby=0)
    ckpt = tmp_path / "ckpt"

    def kill_at_step_100(_runner: threading.Thread) -> None:
        job.wait_step(100)
        job.shards.procs[1].kill()  # kill -9 during training

    result = supervised(job, ckpt, steps, kill_at_step_100)
    assert result.restarts >= 1 and 1 in result.recovered_shards  # (a loaded machine may add one)
    assert (ckpt / "LATEST").exists()
    assert_equals_reference(job, steps)


def test_shard_killed_during_a_checkpoint_is_recovered_before_its_lease_runs_out(job_factory, tmp_path, monkeypatch):
    """kill -9 while rank 0 checkpoints: the trainers can fail within milliseconds, long before the shard's
    4 s lease runs out. The supervisor sees the exited process, waits for the replacement to register (the
    dead one's record still reads ALIVE), and the job ends as if uninterrupted; CI once read this moment as
    "trainers exited, every shard alive"."""
    monkeypatch.setenv(failpoints.ENV, "shard.checkpoint=sleep(0.3)")  # each shard's part takes >= 0.3 s
    steps = 240
    job = job_factory(standby=0)
    ckpt = tmp_path / "ckpt"

    def kill_in_the_checkpoint_of_step_79(runner: threading.Thread) -> None:
        deadline = time.monotonic() + 180
        while not (ckpt / ".step-79.tmp" / "shard-0" / "manifest.json").exists():  # shard 1's part is next
            assert time.monotonic() < deadline and runner.is_alive(), "no checkpoint of step 79"
            time.sleep(0.005)
        job.shards.procs[1].kill()

    result = supervised(job, ckpt, steps, kill_in_the_checkpoint_of_step_79)
    assert result.restarts >= 1 and 1 in result.recovered_shards
    assert (ckpt / "LATEST").read_text() == f"step-{steps - 1}"
    assert_equals_reference(job, steps)


def test_concurrent_applies_exactly_one_wins(job_factory):
    job = job_factory(standby=0)
    rows_wise = PLAN1.__class__()
    rows_wise.CopyFrom(PLAN1)
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def apply(i: int) -> None:
        barrier.wait()
        try:
            results[i] = final(job.client.apply(rows_wise, base_version=1, author=f"op{i}", reason="race"))
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=apply, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wins = [r for r in results if isinstance(r, pb.RolloutProgress) and r.phase == pb.DONE]
    losses = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(wins) == 1 and len(losses) == 1, results
    assert losses[0].code() == grpc.StatusCode.ABORTED and "conflict" in losses[0].details()
    assert job.client.history().current_version == 2
