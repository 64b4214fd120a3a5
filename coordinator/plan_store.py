"""Versioned sharding plans in Redis, and the lock that lets one rollout at a time change them.

Keys (prefix = namespace, default "recsys"):
  {ns}:plan:current        the committed version (absent: none yet)
  {ns}:plan:next           the last version number handed out; never goes back, so an aborted
                           rollout's number is never reused
  {ns}:plan:record:{v}     coordinator_pb2.PlanRecord, serialized (pending, committed or aborted)
  {ns}:plan:history        committed versions, newest first
  {ns}:rollout:lock        JSON of the running rollout's claim, with a TTL
  {ns}:rollout:log         rollout ids, newest first
  {ns}:rollout:entry:{id}  JSON of one rollout attempt and its outcome

A log entry records the phase the rollout reached (PREPARING, FENCING, MIGRATING with the fence step,
COMMITTING once the flip made its plan current, DONE once every shard committed, ABORTED), so that a
coordinator restarted after a crash can finish or abort it (coordinator/rollout_recovery.py).

Every state change is one optimistic transaction (WATCH/MULTI/EXEC): two coordinators (threads or
processes) that race see exactly one winner; the loser retries, sees the winner's lock, and gets a
PlanConflict that names it. The lock carries its own expiry time from `clock` (so tests can inject
one) and a Redis TTL of the same length (so a crashed coordinator's lock also vanishes by itself).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis

from coordinator.redis_backend import require_bytes
from protos import common_pb2, coordinator_pb2

T = TypeVar("T")
LOG_KEEP = 1000  # rollout log entries kept


class PlanConflict(Exception):
    """The store refused a change because someone else's rollout or plan got there first."""

    def __init__(self, message: str, *, holder: RolloutClaim | None = None, current_version: int | None = None):
        super().__init__(message)
        self.holder = holder
        self.current_version = current_version


class PlanNotFound(KeyError):
    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "plan not found"


@dataclass
class RolloutClaim:
    """The right to change the current plan from `from_version` to `to_version`, while the lock lasts."""

    rollout_id: str
    from_version: int
    to_version: int
    author: str
    reason: str
    started_at: float


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _in_progress(claim: RolloutClaim) -> str:
    return (f"rollout {claim.rollout_id} to version {claim.to_version} by {claim.author!r} is in progress "
            f"since {_when(claim.started_at)}")


class PlanStore:
    """The coordinator's only writer of plans: every coordinator replica shares one through Redis.

    redis_client must return bytes (the default; `redis_backend.connect` gives one). Thread-safe: each
    call runs its own transaction on the client's connection pool.
    """

    def __init__(self, redis_client: redis.Redis, namespace: str = "recsys", lock_ttl_s: float = 120.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not namespace:
            raise ValueError("namespace: empty")
        if lock_ttl_s <= 0:
            raise ValueError(f"lock_ttl_s: must be > 0, got {lock_ttl_s}")
        require_bytes(redis_client, "PlanStore")
        self.redis = redis_client
        self.namespace = namespace
        self.lock_ttl_s = lock_ttl_s
        self.clock = clock
        p = f"{namespace}:"
        self._current = p + "plan:current"
        self._next = p + "plan:next"
        self._history = p + "plan:history"
        self._lock = p + "rollout:lock"
        self._log = p + "rollout:log"

    def _record_key(self, version: int) -> str:
        return f"{self.namespace}:plan:record:{version}"

    def _entry_key(self, rollout_id: str) -> str:
        return f"{self.namespace}:rollout:entry:{rollout_id}"

    # -- reads ------------------------------------------------------------------------------------
    def current_version(self) -> int:
        """The committed version; 0 before the first plan."""
        raw = self.redis.get(self._current)
        return int(raw) if raw is not None else 0

    def current(self) -> coordinator_pb2.PlanRecord | None:
        v = self.current_version()
        return self.get(v) if v else None

    def get(self, version: int) -> coordinator_pb2.PlanRecord:
        """Any stored version: committed, or pending / aborted (rollouts keep their target for audit)."""
        raw = self.redis.get(self._record_key(int(version))) if version > 0 else None
        if raw is None:
            raise PlanNotFound(f"plan version {version} not found (current version is {self.current_version()})")
        return coordinator_pb2.PlanRecord.FromString(raw)

    def history(self, limit: int = 0) -> list[coordinator_pb2.PlanRecord]:
        """Committed plans, newest first; `limit` 0 means all."""
        if limit < 0:
            raise ValueError(f"limit: must be >= 0, got {limit}")
        versions = self.redis.lrange(self._history, 0, limit - 1 if limit else -1)
        if not versions:
            return []
        raws = self.redis.mget([self._record_key(int(v)) for v in versions])
        return [coordinator_pb2.PlanRecord.FromString(r) for r in raws if r is not None]

    def rollout_in_progress(self) -> RolloutClaim | None:
        claim, _ = self._live_lock(self.redis.get(self._lock))
        return claim

    def rollout_log(self, limit: int = 20) -> list[dict[str, Any]]:
        """Rollout attempts newest first: id, from, to, author, reason, outcome, why, started, ended.

        outcome is "in_progress", "done" or "aborted" (a rollout whose lock expired is marked aborted
        by the next one that begins); phase and fence_step say how far it got.
        """
        ids = self.redis.lrange(self._log, 0, limit - 1 if limit > 0 else -1)
        if not ids:
            return []
        raws = self.redis.mget([self._entry_key(i.decode()) for i in ids])
        return [json.loads(r) for r in raws if r is not None]

    # -- changes ----------------------------------------------------------------------------------
    def initialize(self, plan: common_pb2.ShardingPlan, author: str, reason: str) -> coordinator_pb2.PlanRecord:
        """Stores the first plan as current (version 1 on a fresh store); refused once any plan exists."""
        _check_request(plan, author)

        def txn(pipe: redis.client.Pipeline) -> coordinator_pb2.PlanRecord:
            current = _int(pipe.get(self._current))
            if current:
                raise PlanConflict(f"cannot initialize: a current plan exists (version {current}); "
                                   "roll out a new plan instead", current_version=current)
            holder, _ = self._live_lock(pipe.get(self._lock))
            if holder is not None:
                raise PlanConflict(f"cannot initialize: {_in_progress(holder)}", holder=holder)
            version = _int(pipe.get(self._next)) + 1
            record = self._record(plan, version, author, reason, parent=0)
            pipe.multi()
            pipe.set(self._next, version)
            pipe.set(self._record_key(version), record.SerializeToString())
            pipe.set(self._current, version)
            pipe.lpush(self._history, version)
            return record

        return self._transaction(txn, self._current, self._lock, self._next)

    def begin_rollout(self, plan: common_pb2.ShardingPlan, base_version: int, author: str,
                      reason: str) -> RolloutClaim:
        """Takes the rollout lock and reserves the next version for `plan` (stored as pending).

        base_version is the version the plan was made against; 0 accepts whatever is current.
        """
        _check_request(plan, author)
        if base_version < 0:
            raise ValueError(f"base_version: must be >= 0, got {base_version}")
        rollout_id = f"r-{uuid.uuid4().hex[:12]}"

        def txn(pipe: redis.client.Pipeline) -> RolloutClaim:
            holder, stale = self._live_lock(pipe.get(self._lock))
            if holder is not None:
                raise PlanConflict(f"another rollout holds the lock: {_in_progress(holder)}", holder=holder)
            current = _int(pipe.get(self._current))
            if base_version and base_version != current:
                raise PlanConflict(f"plan was made against version {base_version} but the current version is "
                                   f"{current}", current_version=current)
            version = max(_int(pipe.get(self._next)), current) + 1
            now = self.clock()
            claim = RolloutClaim(rollout_id, current, version, author, reason, now)
            record = self._record(plan, version, author, reason, parent=current)
            expired = self._expired_entry(pipe, stale)
            pipe.multi()
            pipe.set(self._next, version)
            pipe.set(self._record_key(version), record.SerializeToString())
            pipe.set(self._lock, self._lock_value(claim, now), px=self._ttl_ms())
            if expired is not None:
                pipe.set(self._entry_key(expired["id"]), json.dumps(expired))
            pipe.set(self._entry_key(rollout_id), json.dumps(_entry(claim)))
            pipe.lpush(self._log, rollout_id)
            pipe.ltrim(self._log, 0, LOG_KEEP - 1)
            return claim

        return self._transaction(txn, self._lock, self._current, self._next)

    def refresh(self, claim: RolloutClaim) -> None:
        """Extends the lock by lock_ttl_s from now; PlanConflict when the lock is no longer ours."""

        def txn(pipe: redis.client.Pipeline) -> None:
            self._check_ours(pipe, claim, "refresh")
            pipe.multi()
            pipe.set(self._lock, self._lock_value(claim, self.clock()), px=self._ttl_ms())

        self._transaction(txn, self._lock)

    def commit_rollout(self, claim: RolloutClaim) -> coordinator_pb2.PlanRecord:
        """Makes the claimed version current, if the lock is still ours and nobody moved current."""

        def txn(pipe: redis.client.Pipeline) -> coordinator_pb2.PlanRecord:
            self._check_ours(pipe, claim, "commit")
            current = _int(pipe.get(self._current))
            if current != claim.from_version:
                raise PlanConflict(f"plan was made against version {claim.from_version} but the current version "
                                   f"is {current}", current_version=current)
            raw = pipe.get(self._record_key(claim.to_version))
            if raw is None:
                raise PlanNotFound(f"plan version {claim.to_version} of rollout {claim.rollout_id} is missing")
            entry = self._entry(pipe, claim)
            # the plan is current; the shards still have to commit it (phase DONE once they did)
            entry.update(outcome="done", phase="COMMITTING", ended=self.clock())
            pipe.multi()
            pipe.set(self._current, claim.to_version)
            pipe.lpush(self._history, claim.to_version)
            pipe.delete(self._lock)
            pipe.set(self._entry_key(claim.rollout_id), json.dumps(entry))
            return coordinator_pb2.PlanRecord.FromString(raw)

        return self._transaction(txn, self._lock, self._current)

    def abort_rollout(self, claim: RolloutClaim, why: str) -> bool:
        """Logs the attempt as aborted and releases the lock if still ours (True); current is unchanged."""

        def txn(pipe: redis.client.Pipeline) -> bool:
            holder, _ = self._live_lock(pipe.get(self._lock), live_only=False)
            ours = holder is not None and holder.rollout_id == claim.rollout_id
            entry = self._entry(pipe, claim)
            pipe.multi()
            if ours:
                pipe.delete(self._lock)
            if entry.get("outcome") == "in_progress":
                entry.update(outcome="aborted", phase="ABORTED", why=why, ended=self.clock())
                pipe.set(self._entry_key(claim.rollout_id), json.dumps(entry))
            return ours

        return self._transaction(txn, self._lock, self._entry_key(claim.rollout_id))

    def log_phase(self, claim: RolloutClaim, phase: str, fence_step: int | None = None) -> None:
        """Records the phase a running rollout reached (and its fence step) in its log entry, and extends
        its lock; PlanConflict when the lock is no longer ours (nothing written then)."""

        def txn(pipe: redis.client.Pipeline) -> None:
            self._check_ours(pipe, claim, f"log phase {phase} of")
            entry = self._entry(pipe, claim)
            entry["phase"] = phase
            if fence_step is not None:
                entry["fence_step"] = fence_step
            pipe.multi()
            pipe.set(self._lock, self._lock_value(claim, self.clock()), px=self._ttl_ms())
            pipe.set(self._entry_key(claim.rollout_id), json.dumps(entry))

        self._transaction(txn, self._lock)

    def log_committed(self, rollout_id: str, why: str = "") -> None:
        """After the flip: every shard was asked to commit (`why` lists those that failed); phase DONE."""

        def txn(pipe: redis.client.Pipeline) -> None:
            raw = pipe.get(self._entry_key(rollout_id))
            if raw is None:
                raise PlanNotFound(f"rollout {rollout_id}: no log entry")
            entry = json.loads(raw)
            entry.update(phase="DONE", why=why)
            pipe.multi()
            pipe.set(self._entry_key(rollout_id), json.dumps(entry))

        self._transaction(txn, self._entry_key(rollout_id))

    def unfinished_rollouts(self, limit: int = 10) -> list[dict[str, Any]]:
        """Log entries, newest first among the last `limit`, that a crashed coordinator left open: still
        in progress (before the flip), or flipped (phase COMMITTING) but not logged as committed."""
        return [e for e in self.rollout_log(limit)
                if e.get("outcome") == "in_progress" or e.get("phase") == "COMMITTING"]

    # -- internals --------------------------------------------------------------------------------
    def _transaction(self, fn: Callable[[redis.client.Pipeline], T], *watch: str) -> T:
        """Runs fn under WATCH until EXEC succeeds; fn raises to refuse (nothing is written then)."""
        return self.redis.transaction(fn, *watch, value_from_callable=True)

    def _ttl_ms(self) -> int:
        return max(1, round(self.lock_ttl_s * 1000))

    def _lock_value(self, claim: RolloutClaim, now: float) -> str:
        return json.dumps({**asdict(claim), "expires_at": now + self.lock_ttl_s})

    def _live_lock(self, raw: bytes | None, live_only: bool = True) -> tuple[RolloutClaim | None, RolloutClaim | None]:
        """(holder, None) for an unexpired lock, (None, expired claim) for one past its time."""
        if raw is None:
            return None, None
        data = json.loads(raw)
        expires_at = data.pop("expires_at")
        claim = RolloutClaim(**data)
        if live_only and expires_at <= self.clock():
            return None, claim
        return claim, None

    def _check_ours(self, pipe: redis.client.Pipeline, claim: RolloutClaim, action: str) -> None:
        holder, stale = self._live_lock(pipe.get(self._lock))
        if holder is not None and holder.rollout_id == claim.rollout_id:
            return
        if holder is not None:
            raise PlanConflict(f"cannot {action} rollout {claim.rollout_id}: it lost its lock; "
                               f"{_in_progress(holder)}", holder=holder)
        what = "expired" if stale is not None and stale.rollout_id == claim.rollout_id else "is gone"
        raise PlanConflict(f"cannot {action} rollout {claim.rollout_id}: its lock {what} "
                           f"(lock_ttl_s {self.lock_ttl_s}; refresh it more often)")

    def _entry(self, pipe: redis.client.Pipeline, claim: RolloutClaim) -> dict[str, Any]:
        raw = pipe.get(self._entry_key(claim.rollout_id))
        return json.loads(raw) if raw is not None else _entry(claim)

    def _expired_entry(self, pipe: redis.client.Pipeline, stale: RolloutClaim | None) -> dict[str, Any] | None:
        """The log entry of a rollout whose lock ran out, marked aborted (None if already closed)."""
        if stale is None:
            return None
        entry = self._entry(pipe, stale)
        if entry.get("outcome") != "in_progress":
            return None
        entry.update(outcome="aborted", phase="ABORTED", why=f"lock expired (lock_ttl_s {self.lock_ttl_s})",
                     ended=self.clock())
        return entry

    def _record(self, plan: common_pb2.ShardingPlan, version: int, author: str, reason: str,
                parent: int) -> coordinator_pb2.PlanRecord:
        record = coordinator_pb2.PlanRecord(author=author, reason=reason, created_at=self.clock(),
                                            parent_version=parent)
        record.plan.CopyFrom(plan)
        record.plan.version = version
        return record


def _entry(claim: RolloutClaim) -> dict[str, Any]:
    return {"id": claim.rollout_id, "from": claim.from_version, "to": claim.to_version, "author": claim.author,
            "reason": claim.reason, "outcome": "in_progress", "why": "", "started": claim.started_at,
            "ended": None, "phase": "PREPARING", "fence_step": None}


def claim_of(entry: dict[str, Any]) -> RolloutClaim:
    """The claim a log entry was made for (what a restarted coordinator acts on)."""
    return RolloutClaim(entry["id"], entry["from"], entry["to"], entry["author"], entry["reason"], entry["started"])


def _int(raw: bytes | None) -> int:
    return int(raw) if raw is not None else 0


def _check_request(plan: common_pb2.ShardingPlan, author: str) -> None:
    if not isinstance(plan, common_pb2.ShardingPlan):
        raise TypeError(f"plan: expected recsys.v1.ShardingPlan, got {type(plan).__name__}")
    if not author or not author.strip():
        raise ValueError("author: required (who is changing the plan)")
