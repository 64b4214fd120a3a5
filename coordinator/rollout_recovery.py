"""Finishes or aborts, at start-up, the rollout a killed coordinator left open, from its log entry in Redis.

The rollout log entry records the phase reached (and the fence step once every trainer stopped). The
flip (store.commit_rollout) is the single point of no return:

- before it (PREPARING, FENCING, MIGRATING), the old plan is current and complete: every shard drops
  what it staged (Abort), the lock is released, and the trainers get RESUME on the old version;
- after it (COMMITTING), the new plan is current: every shard commits it at the fence step (Commit is
  idempotent, so shards that already committed answer OK), and the trainers get RESUME on the new one.

The entry's `why` says "recovered after coordinator restart: aborted|finished". Runs before the server
takes rollouts; the RESUME is replayed to trainers whose plan watch reconnects afterwards (PlanEvents).
Assumes one coordinator runs rollouts at a time (a second replica's live rollout would look abandoned).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator.membership import Membership
from coordinator.plan_store import PlanStore, claim_of
from coordinator.rollout import RolloutEngine, commit_all, parallel
from protos import coordinator_pb2
from protos.shard_client import ShardClient

log = logging.getLogger(__name__)
pb = coordinator_pb2
PREFIX = "recovered after coordinator restart"


@dataclass
class Recovered:
    rollout_id: str
    outcome: str  # "aborted" or "finished"
    phase: str  # the phase the killed coordinator had logged
    message: str


class RolloutRecovery:
    def __init__(self, store: PlanStore, membership: Membership, engine: RolloutEngine) -> None:
        self.store, self.membership, self.engine = store, membership, engine

    def run(self) -> list[Recovered]:
        """Closes every rollout left open, oldest first."""
        done = [self._recover(e) for e in reversed(self.store.unfinished_rollouts())]
        for r in done:
            log.warning("rollout %s (%s at the restart): %s", r.rollout_id, r.phase, r.message)
        return done

    def _recover(self, entry: dict[str, Any]) -> Recovered:
        claim = claim_of(entry)
        phase = entry.get("phase") or "PREPARING"
        clients = self._clients(claim.from_version, claim.to_version)
        try:
            if phase == "COMMITTING":
                return self._finish(entry, phase, clients)
            return self._abort(entry, phase, clients)
        finally:
            for c in clients.values():
                c.close()

    def _abort(self, entry: dict[str, Any], phase: str, clients: dict[int, ShardClient]) -> Recovered:
        claim = claim_of(entry)
        errors = parallel({i: (lambda c=c: c.abort(claim.to_version)) for i, c in clients.items()}, "Abort")
        why = f"{PREFIX}: aborted (the coordinator died in phase {phase}; version {claim.from_version} stays current)"
        if errors:  # a shard that is down holds nothing staged once it restarts
            why += "; " + "; ".join(errors)
        self.store.abort_rollout(claim, why)
        self._resume(claim.rollout_id, claim.from_version, claim.to_version, entry, pb.ABORTED, why)
        return Recovered(claim.rollout_id, "aborted", phase, why)

    def _finish(self, entry: dict[str, Any], phase: str, clients: dict[int, ShardClient]) -> Recovered:
        claim = claim_of(entry)
        step = entry.get("fence_step")
        if step is None:  # logged before fence steps were: the shards' applied step is the boundary
            step = max((s for s in map(_applied_step, clients.values()) if s is not None), default=-1)
        errors = commit_all(clients, claim.to_version, step)
        why = f"{PREFIX}: finished (the coordinator died after the flip; version {claim.to_version} committed " \
              f"at step {step})"
        if errors:  # a shard that failed to commit needs recovery (restart from checkpoint)
            why += "; " + "; ".join(errors)
        self.store.log_committed(claim.rollout_id, why)
        self._resume(claim.rollout_id, claim.to_version, claim.to_version, entry, pb.DONE, why)
        return Recovered(claim.rollout_id, "finished", phase, why)

    def _clients(self, from_version: int, to_version: int) -> dict[int, ShardClient]:
        """The shards of both plans, at their registered addresses (alive or not: a coordinator down longer
        than the lease sees them all as dead until they heartbeat again), with the coordinator's credentials."""
        ids: set[int] = set()
        for v in (from_version, to_version):
            if v:
                ids.update(range(self.store.get(v).plan.num_shards))
        make: Callable[[str, int], ShardClient] = self.engine.shard_client
        return {m.id: make(m.address, from_version) for m in self.membership.members(pb.SHARD)
                if m.id in ids and m.address}

    def _resume(self, rollout_id: str, version: int, to_version: int, entry: dict[str, Any], phase: int,
                message: str) -> None:
        fence_step = entry.get("fence_step")
        self.engine.restore_progress(pb.RolloutProgress(
            rollout_id=rollout_id, phase=phase, from_version=entry["from"], to_version=to_version,
            fence_step=fence_step if fence_step is not None else 0, message=message))
        self.engine.events.publish(pb.PlanEvent(kind=pb.RESUME, plan_version=version, rollout_id=rollout_id))


def _applied_step(client: ShardClient) -> int | None:
    try:
        return client.info().applied_step
    except grpc.RpcError:  # down: it commits nothing either way
        return None
