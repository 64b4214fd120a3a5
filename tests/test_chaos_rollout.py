"""Chaos over a live rollout (issue 11, item 6): the coordinator killed (kill -9, via a failpoint) in each
phase of a rollout, and Redis killed and restarted mid-migration. Real coordinator, shards, trainers and
redis-server processes on loopback; each scenario ends with the model of the fault-free reference (1e-5)
and prints `CHAOS <scenario>: outcome, seconds to recover`.

- coordinator kill -9 before the flip (phase PREPARING: every shard staged; FENCING: one trainer's report
  recorded, unanswered, the other stopping or reporting; MIGRATING: fence step logged): the trainers retry
  their report or, when the FENCE never reached them, take the replayed RESUME of the rollout their peer
  stopped for; the coordinator restarted on the same port and data dir aborts
  the rollout from its log entry (every shard drops what it staged, version 1 stays current, the lock is
  released, the trainers resume on version 1);
- coordinator kill -9 after the flip (store.commit_rollout done, no shard committed) and during the
  shards' Commit (one shard committed): the restarted coordinator finishes it (Commit on every shard at
  the logged fence step, idempotent where already done; the trainers resume on version 2);
- Redis (a separate redis-server, append-only) killed -9 mid-migration and restarted on the same port
  after the coordinator reached the flip: the coordinator waits for it, flips, and the rollout is DONE
  with a message saying how long it waited; meanwhile membership RPCs answer UNAVAILABLE naming Redis;
  the store is consistent afterwards; Redis down longer than redis_wait_s right at the flip (a lost
  connection: did it land?) is waited for, never aborted, then flipped.
- the trainer side on its own (one PlanFollower, no training): a trainer waiting for a FENCE its peers
  saw but it never got, and one whose ReportFenced was cut off by the kill, are both resumed on the old
  plan by the restarted coordinator's replayed RESUME.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from coordinator.events import PlanEvents
from coordinator.membership import Membership
from coordinator.plan_store import PlanStore
from coordinator.process import launch as launch_coordinator
from coordinator.redis_backend import EmbeddedRedis, connect
from coordinator.rollout import RolloutEngine, RolloutSettings
from protos import coordinator_pb2
from protos.coordinator_client import CoordinatorClient, final
from protos.failpoints import ENV as FAILPOINTS
from protos.process import free_port
from protos.shard_client import ShardClient
from tests.coordinated import PLAN2, Job, assert_equals_reference
from trainer.coordination import PlanFollower

pb = coordinator_pb2
STEPS = 200  # the rollout fences long before the last step, even on a fast machine



def shard_states(job: Job, ids: range) -> dict[int, tuple[int, int]]:
    """shard -> (live plan version, staged plan version: 0 when nothing is staged)."""
    out = {}
    for m in job.client.members():
        if m.kind == pb.SHARD and m.id in ids:
            with ShardClient(m.address) as c:
                info = c.info()
                out[m.id] = (info.plan_version, info.staged_version)
    return out


def wait_resumed(job: Job, past: int, timeout: float = 120.0) -> None:
    """Until both trainers report a step beyond `past`, or the job finished."""
    deadline = time.monotonic() + timeout
    while job.trainers.poll() is None:
        steps = [m.step for m in job.client.members() if m.kind == pb.TRAINER and m.state == pb.ALIVE]
        if len(steps) == 2 and min(steps) > past:
            return
        assert time.monotonic() < deadline, f"trainers did not resume past step {past}: {steps}\n" \
                                            f"{job.trainers.stderr_tail()}"
        time.sleep(0.05)


# (scenario, failpoint, recovery outcome, current version after recovery, fence step logged)
PHASES = [
    ("preparing", "rollout.prepared", "aborted", 1, False),
    ("fencing", "rollout.fence_reported", "aborted", 1, False),
    ("migrating", "rollout.migrating", "aborted", 1, True),
    ("after-flip", "rollout.after_flip", "finished", 2, True),
    ("committing", "rollout.commit_shard", "finished", 2, True),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario,failpoint,outcome,version,logged_step", PHASES, ids=[p[0] for p in PHASES])
def test_coordinator_kill9_in_rollout_phase(job_factory, tmp_path: Path, scenario, failpoint, outcome, version,
                                            logged_step):
    port = free_port()
    job = job_factory("--port", str(port), coordinator_env={FAILPOINTS: f"{failpoint}=kill"})
    trainers = job.train(STEPS)
    job.wait_step(10)
    with pytest.raises(grpc.RpcError) as broke:  # the failpoint kills the coordinator mid-rollout
        final(job.client.apply(PLAN2, base_version=1, author="chaos", reason=f"killed in {scenario}"))
    assert broke.value.code() == grpc.StatusCode.UNAVAILABLE, broke.value.details()
    assert job.coordinator.proc.wait(30) == -signal.SIGKILL, job.coordinator.log_tail()
    assert f"failpoint {failpoint}: kill" in job.coordinator.log_tail(20000)
    killed_at = time.monotonic()
    # the same port and data dir (its append-only embedded Redis), no failpoint, no --initial-plan
    job.coordinator = launch_coordinator(["--lease-s", "4", "--port", str(port)], workdir=tmp_path / "coordinator")
    restarted = time.monotonic() - killed_at
    job.client.close()
    job.client = CoordinatorClient(job.coordinator.address, token=job.coordinator.token)
    announced = job.coordinator.announced["recovered_rollouts"]
    assert [r["outcome"] for r in announced] == [outcome], announced

    # the store: the log entry is closed with the recovery's outcome, no lock is held, the right plan is current
    store = PlanStore(connect(job.coordinator.announced["redis"]))
    entry = store.rollout_log(1)[0]
    assert entry["id"] == announced[0]["id"] and (entry["from"], entry["to"]) == (1, 2)
    assert entry["why"].startswith(f"recovered after coordinator restart: {outcome}"), entry
    assert entry["outcome"] == ("aborted" if outcome == "aborted" else "done"), entry
    assert entry["phase"] == ("ABORTED" if outcome == "aborted" else "DONE"), entry
    assert (entry["fence_step"] is not None) == logged_step, entry
    assert store.rollout_in_progress() is None and store.unfinished_rollouts() == []
    assert store.current_version() == version and store.current().plan.version == version
    status = job.client.status()
    assert (status.rollout_id, status.phase) == (entry["id"], pb.ABORTED if outcome == "aborted" else pb.DONE)
    # the shards: nothing staged anywhere; the current plan live on every shard of it
    plan_shards = range(store.current().plan.num_shards)
    deadline = time.monotonic() + 30
    while len(states := shard_states(job, range(3))) < 3:  # registered again with the new coordinator
        assert time.monotonic() < deadline, states
        time.sleep(0.1)
    assert all(staged == 0 for _, staged in states.values()), states
    assert all(states[i][0] == version for i in plan_shards), states
    # the trainers: resumed (never fenced forever) and finished equal to the fault-free reference
    wait_resumed(job, entry["fence_step"] if entry["fence_step"] is not None else 0)
    resumed = time.monotonic() - killed_at
    job.wait_trainers(timeout=180)
    assert trainers.poll() == 0
    assert_equals_reference(job, STEPS)
    print(f"\nCHAOS coordinator-kill9-{scenario}: {outcome} (v{version} current); coordinator restarted and "
          f"recovered the rollout in {restarted:.2f}s; trainers resumed {resumed:.2f}s after the kill; "
          f"equals the reference (1e-5)")


@pytest.mark.timeout(240)
def test_a_fenced_trainer_outlives_the_coordinator(tmp_path: Path):
    """The trainer side, without the timing of a training job: a trainer told to fence by its peers whose
    FENCE never came (the coordinator died first) takes the RESUME the restarted coordinator replays; a
    trainer whose report killed the coordinator retries it and is resumed on the old plan."""
    port = free_port()
    job = Job(tmp_path, "--port", str(port), coordinator_env={FAILPOINTS: "rollout.prepared=kill"})
    follower = PlanFollower(job.coordinator.address, rank=0).start()
    pool = ThreadPoolExecutor(1)

    def restart(env: dict[str, str] | None = None) -> float:
        assert job.coordinator.proc.wait(30) == -signal.SIGKILL, job.coordinator.log_tail()
        killed_at = time.monotonic()
        job.coordinator = launch_coordinator(["--lease-s", "4", "--port", str(port)],
                                             workdir=tmp_path / "coordinator", env=env)
        job.client.close()
        job.client = CoordinatorClient(job.coordinator.address, token=job.coordinator.token)
        return killed_at

    try:
        follower.current_plan()
        with pytest.raises(grpc.RpcError):  # killed after staging: no FENCE was ever sent
            final(job.client.apply(PLAN2, base_version=1, author="chaos", reason="no fence"))
        waiting = pool.submit(follower.fence, 7, 120)  # as if a peer had seen a FENCE
        killed_at = restart({FAILPOINTS: "rollout.fence_reported=kill"})
        resumed = waiting.result(timeout=90)
        orphan_s = time.monotonic() - killed_at
        assert (resumed.kind, resumed.plan_version) == (pb.RESUME, 1)
        assert resumed.rollout_id == job.coordinator.announced["recovered_rollouts"][0]["id"]
        assert not follower.fence_pending
        # the shards' leases may have lapsed while the coordinator was down (a loaded host restarts it slowly):
        # PLAN2's shards must have heartbeated to the new one first, or the plan is refused for a dead owner
        job.client.wait_shards(list(range(PLAN2.num_shards)), wait_s=60)

        rollout = job.client.apply(PLAN2, base_version=1, author="chaos", reason="killed by the report")
        first = next(rollout)
        deadline = time.monotonic() + 30
        while not follower.fence_pending:
            assert time.monotonic() < deadline, "no FENCE reached the trainer"
            time.sleep(0.05)
        waiting = pool.submit(follower.fence, 9, 120)  # its report kills the coordinator
        with pytest.raises(grpc.RpcError):
            list(rollout)
        killed_at = restart()
        resumed = waiting.result(timeout=90)
        report_s = time.monotonic() - killed_at
        assert (resumed.kind, resumed.plan_version, resumed.rollout_id) == (pb.RESUME, 1, first.rollout_id)
        entry = PlanStore(connect(job.coordinator.announced["redis"])).rollout_log(1)[0]
        assert entry["id"] == first.rollout_id and entry["phase"] == "ABORTED", entry
        assert "the coordinator died in phase FENCING" in entry["why"], entry
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        follower.close()
        job.close()
    print(f"\nCHAOS coordinator-kill9-trainer-side: a trainer that never got the FENCE resumed {orphan_s:.2f}s "
          f"after the kill; one whose report was cut off resumed {report_s:.2f}s after the kill (both on v1)")


@pytest.mark.timeout(240)
def test_redis_restarted_mid_migration(job_factory, tmp_path: Path):
    redis_dir, redis_port = tmp_path / "redis-server", free_port()
    servers = [EmbeddedRedis(redis_dir, port=redis_port)]  # a separate redis-server, append-only
    try:
        connect(servers[0].url).config_set("appendfsync", "always")  # nothing answered is lost to the kill -9
        # the coordinator pauses 3 s at the start of the migration: Redis is killed then and stays down past it
        job = job_factory("--redis", servers[0].url, coordinator_env={FAILPOINTS: "rollout.migrating=sleep(3)"})
        job.train(STEPS)
        job.wait_step(10)
        killed_at = back_at = None
        last = None
        for p in job.client.apply(PLAN2, base_version=1, author="chaos", reason="redis restarted"):
            if p.phase == pb.MIGRATING and killed_at is None:
                os.kill(servers[0].pid, signal.SIGKILL)
                killed_at = time.monotonic()
                servers[0].close()
                with pytest.raises(grpc.RpcError) as down:  # what members see meanwhile: retryable, named
                    job.client.members()
                assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value.details()
                assert "the coordinator's Redis is unavailable" in down.value.details()
                time.sleep(5.0)  # the coordinator reaches the flip while Redis is down
                servers.append(EmbeddedRedis(redis_dir, port=redis_port))  # same port, same append-only file
                back_at = time.monotonic()
            last = p
        assert killed_at is not None, last
        finished = time.monotonic() - killed_at
        assert last.phase == pb.DONE, last
        assert "waited" in last.message and "for Redis at the flip" in last.message, last.message
        store = PlanStore(connect(servers[-1].url))
        assert store.current_version() == 2 and store.current().plan.num_shards == 3
        assert [r.plan.version for r in store.history()] == [2, 1]
        assert store.rollout_in_progress() is None and store.unfinished_rollouts() == []
        entry = store.rollout_log(1)[0]
        assert (entry["outcome"], entry["phase"], entry["fence_step"]) == ("done", "DONE", last.fence_step), entry
        wait_resumed(job, last.fence_step)
        resumed = time.monotonic() - killed_at
        job.wait_trainers(timeout=180)
        assert_equals_reference(job, STEPS)
    finally:
        servers[-1].close()
    print(f"\nCHAOS redis-restart-mid-migration: done ({last.message}); Redis down {back_at - killed_at:.2f}s; "
          f"rollout finished {finished:.2f}s and trainers resumed {resumed:.2f}s after the kill; equals the "
          f"reference (1e-5)")


@pytest.mark.timeout(120)
def test_redis_down_past_the_wait_at_the_flip_keeps_waiting_then_flips(tmp_path: Path):
    """Once a connection was lost at the flip, whether it landed is unknown: the engine neither aborts nor
    gives up after redis_wait_s, but waits for Redis and then flips (the real engine and store, a real
    redis-server killed -9 and restarted from its append-only file)."""
    redis_dir, redis_port = tmp_path / "redis", free_port()
    servers = [EmbeddedRedis(redis_dir, port=redis_port)]
    try:
        client = connect(servers[0].url)
        # every write on disk before its reply: under load, everysec may postpone the AOF write (a busy
        # fsync) while already answering, and kill -9 would then lose the rollout's lock
        client.config_set("appendfsync", "always")
        store = PlanStore(client, namespace="flip")
        store.initialize(PLAN2, "test", "first")
        claim = store.begin_rollout(PLAN2, 1, "test", "flip while Redis restarts")
        engine = RolloutEngine(store, Membership(client, namespace="flip"), PlanEvents(),
                               RolloutSettings(redis_wait_s=0.5))
        store.redis.ping()
        os.kill(servers[0].pid, signal.SIGKILL)
        servers[0].close()
        with ThreadPoolExecutor(1) as pool:
            flip = pool.submit(engine._flip, claim)
            time.sleep(2.0)  # four times redis_wait_s
            assert not flip.done(), flip.exception() if flip.done() else None
            servers.append(EmbeddedRedis(redis_dir, port=redis_port))
            waited = flip.result(timeout=60)
        assert waited >= 2.0
        assert store.current_version() == claim.to_version and store.rollout_in_progress() is None
        assert store.rollout_log(1)[0]["phase"] == "COMMITTING"  # the shards' Commit is next
    finally:
        servers[-1].close()
    print(f"\nCHAOS redis-down-at-the-flip: waited {waited:.2f}s past redis_wait_s 0.5 s, then flipped")
