"""The member agent's heartbeat cadence against a real coordinator: every lease / 3 with jitter (no 0.5 s
cap, which tripled a fleet's heartbeat load), and never so late that a healthy member's lease lapses."""

from __future__ import annotations

import time

import pytest

from coordinator.process import launch as launch_coordinator
from protos import coordinator_pb2 as pb
from protos.coordinator_client import CoordinatorClient
from protos.member_agent import JITTER, MemberAgent

LEASE_S = 3.0


@pytest.fixture
def coordinator(tmp_path):
    proc = launch_coordinator(["--lease-s", str(LEASE_S), "--log-level", "WARNING"], workdir=tmp_path / "coordinator")
    client = CoordinatorClient(proc.address)
    yield proc, client
    client.close()
    proc.kill()


def test_agent_beats_every_third_of_the_lease_and_stays_alive(coordinator):
    proc, client = coordinator
    agent = MemberAgent(proc.address, pb.Member(kind=pb.SHARD, id=0, address="127.0.0.1:1"), lambda: (1, 0))
    agent.start(wait_s=30)
    try:
        assert agent.interval_s == pytest.approx(LEASE_S / 3)
        assert agent.interval_s * (1 + JITTER) < LEASE_S / 2, "two beats per lease even at the longest wait"
        seen: set[float] = set()
        deadline = time.monotonic() + 2.5 * LEASE_S
        while time.monotonic() < deadline:  # never DEAD, never registered again (same epoch) over 2.5 leases
            (m,) = client.members()
            assert (m.state, m.epoch) == (pb.ALIVE, agent.epoch), m
            seen.add(m.last_seen)
            time.sleep(0.1)
        assert len(seen) >= 4, f"heartbeats renewed the lease only {len(seen) - 1} times in {2.5 * LEASE_S} s"
    finally:
        agent.stop()
    assert client.members() == []
