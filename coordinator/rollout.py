"""Live plan rollout: fence the trainers, stage the new plan on every shard, pull rows shard-to-shard,
flip the plan version, resume the trainers. Any failure before the flip aborts: the old plan stays
current and complete (the shards only drop what they staged), and the trainers resume on it.

Each phase is logged in the rollout's entry in Redis before it starts (with the fence step once known),
so a coordinator killed mid-rollout is finished or aborted by the next one at start-up
(coordinator/rollout_recovery.py). Redis going away mid-rollout is waited out for `redis_wait_s`.
Failpoints (protos/failpoints.py) mark each phase for the chaos tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass

import grpc
import redis

from coordinator.membership import Membership
from coordinator.moves import Move, MoveError, compute_moves, split_moves
from coordinator.plan_store import PlanConflict, PlanStore, RolloutClaim
from coordinator.scaling import FixedShards, ScalingError, ShardScaler
from coordinator.validation import plan_violations
from protos import common_pb2, coordinator_pb2, embedding_shard_pb2, failpoints
from protos.plan import assignment
from protos.shard_client import ShardClient

log = logging.getLogger(__name__)
pb = coordinator_pb2
TERMINAL = (pb.DONE, pb.ABORTED)


class RolloutRefused(Exception):
    """Refused before anything started; `code` is the gRPC status the caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class RolloutFailed(Exception):
    """A step of a started rollout failed; the rollout aborts with this reason."""


@dataclass
class RolloutSettings:
    fence_timeout_s: float = 120.0
    rpc_timeout_s: float = 600.0
    pull_workers: int = 4
    rows_per_pull: int = 262144
    rate_limit_bytes_per_s: float = 0.0  # 0: unlimited; bounds the network share a migration takes
    tls_ca: str | None = None  # CA of the shards' TLS certificates
    shard_wait_s: float = 300.0  # after scaling up: how long new shards may take to register on standby
    tls_cert: str | None = None  # the coordinator's own certificate, presented to shards that require mTLS
    tls_key: str | None = None
    shard_token: str | None = None  # the shards' control-plane token (Prepare, PullRows, Commit, Abort)
    redis_wait_s: float = 60.0  # how long a rollout waits for an unreachable Redis (a restart) before it gives up


class RolloutEngine:
    def __init__(self, store: PlanStore, membership: Membership, events, settings: RolloutSettings | None = None,
                 on_finish=None, scaler: ShardScaler | None = None) -> None:
        self.store, self.membership, self.events = store, membership, events
        self.scaler: ShardScaler = scaler or FixedShards()  # local default: nothing scales
        self.settings = settings or RolloutSettings()
        self.on_finish = on_finish  # (progress) -> None, for metrics
        self._lock = threading.Condition()
        self.progress = pb.RolloutProgress(phase=pb.IDLE)
        self._fenced: dict[int, int] = {}

    # -- starting -----------------------------------------------------------------------------
    def validate(self, plan: common_pb2.ShardingPlan, current: pb.PlanRecord | None) -> list[str]:
        alive = {m.id: m.capacity_bytes for m in self.membership.alive(pb.SHARD).values()}
        if self.scaler.elastic:  # shards the rollout will scale up to: capacity unknown (0) until they register
            alive.update({i: 0 for i in range(plan.num_shards) if i not in alive})
        tables = list(current.plan.tables) if current is not None else None
        return plan_violations(plan, model_tables=tables, alive_shards=alive)

    def start(self, plan: common_pb2.ShardingPlan, base_version: int, author: str, reason: str) -> str:
        current = self.store.current()
        violations = self.validate(plan, current)
        if violations:
            raise RolloutRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                 "plan refused: " + "; ".join(violations))
        try:
            moves = compute_moves(current.plan, plan) if current is not None else []
        except MoveError as e:
            raise RolloutRefused(grpc.StatusCode.INVALID_ARGUMENT, f"plan refused: {e}") from None
        try:
            claim = self.store.begin_rollout(plan, base_version, author, reason)
        except PlanConflict as e:
            raise RolloutRefused(grpc.StatusCode.ABORTED, f"conflict: {e}") from None
        target = common_pb2.ShardingPlan()
        target.CopyFrom(plan)
        target.version = claim.to_version
        with self._lock:
            self._fenced = {}
            self.progress = pb.RolloutProgress(rollout_id=claim.rollout_id, phase=pb.VALIDATING,
                                               from_version=claim.from_version, to_version=claim.to_version,
                                               bytes_total=sum(m.bytes for m in moves if not m.local),
                                               rows_total=sum(m.rows for m in moves))
        threading.Thread(target=self._run, args=(claim, current, target, moves), name=f"rollout-{claim.to_version}",
                         daemon=True).start()
        log.info("rollout %s: version %d -> %d by %s (%s): %d moves", claim.rollout_id, claim.from_version,
                 claim.to_version, author, reason, len(moves))
        return claim.rollout_id

    # -- observing ----------------------------------------------------------------------------
    def snapshot(self) -> pb.RolloutProgress:
        with self._lock:
            p = pb.RolloutProgress()
            p.CopyFrom(self.progress)
            return p

    def watch(self, rollout_id: str, is_active=lambda: True) -> Iterator[pb.RolloutProgress]:
        """Progress of one rollout until it is DONE or ABORTED."""
        last = None
        while is_active():
            with self._lock:
                if self.progress.rollout_id != rollout_id:
                    return
                if last is not None and self.progress == last:
                    self._lock.wait(timeout=0.5)
                snap = self.snapshot()
            if snap != last:
                yield snap
                last = snap
            if snap.phase in TERMINAL:
                return

    def restore_progress(self, progress: pb.RolloutProgress) -> None:
        """What RolloutStatus shows for a rollout a restarted coordinator finished or aborted."""
        with self._lock:
            self.progress = progress
            self._lock.notify_all()
        if self.on_finish is not None:  # counted with the rollouts this coordinator ran
            self.on_finish(self.snapshot())

    def _update(self, **fields) -> None:
        with self._lock:
            for k, v in fields.items():
                setattr(self.progress, k, v)
            self._lock.notify_all()

    def report_fenced(self, trainer_id: int, rollout_id: str, step: int) -> None:
        with self._lock:
            if self.progress.rollout_id != rollout_id or self.progress.phase != pb.FENCING:
                phase = pb.RolloutPhase.Name(self.progress.phase)
                raise RolloutRefused(grpc.StatusCode.FAILED_PRECONDITION,
                                     f"rollout_id {rollout_id!r}: not fencing (current rollout "
                                     f"{self.progress.rollout_id!r}, phase {phase})")
            self._fenced[trainer_id] = step
            self._lock.notify_all()
        failpoints.hit("rollout.fence_reported")

    # -- running ------------------------------------------------------------------------------
    def _run(self, claim: RolloutClaim, current: pb.PlanRecord | None, plan: common_pb2.ShardingPlan,
             moves: list[Move]) -> None:
        fenced_at = None
        clients: dict[int, ShardClient] = {}
        staged = False
        scaled_from = None
        try:
            # staging allocates and seeds the new slices: done while the trainers still train
            self._update(phase=pb.PREPARING)
            scaled_from = self._scale_up(plan)
            shards = self.membership.alive(pb.SHARD)
            ids = set(range(plan.num_shards)) | (set(range(current.plan.num_shards)) if current else set())
            missing = sorted(i for i in ids if i not in shards)
            if missing:
                raise RolloutFailed(f"shards {missing} are not registered and alive")
            clients = {i: self.shard_client(shards[i].address, claim.from_version) for i in sorted(ids)}
            staged = True
            errors = parallel({i: (lambda c=c, i=i: c.prepare(assignment(plan, i))) for i, c in clients.items()},
                              "Prepare")
            if errors:
                raise RolloutFailed("; ".join(errors))
            failpoints.hit("rollout.prepared")
            self._store("log the phase", lambda: self.store.log_phase(claim, "FENCING"))
            self._update(phase=pb.FENCING)
            fenced_at = time.monotonic()
            self.events.publish(pb.PlanEvent(kind=pb.FENCE, plan_version=claim.from_version,
                                             rollout_id=claim.rollout_id, target_version=claim.to_version))
            step = self._await_fence(claim)
            if step < 0 and current is not None:  # no trainers: the shards' applied step is the boundary
                step = max(c.info().applied_step for i, c in clients.items() if i < current.plan.num_shards)
            # the fence step is the step every shard commits at: a restarted coordinator needs it after the flip
            self._store("log the phase", lambda: self.store.log_phase(claim, "MIGRATING", fence_step=step))
            self._update(phase=pb.MIGRATING, fence_step=step, pause_s=time.monotonic() - fenced_at)
            failpoints.hit("rollout.migrating")
            self._migrate(claim, moves, clients, shards, fenced_at)
            self._update(phase=pb.COMMITTING, pause_s=time.monotonic() - fenced_at)
            waited = self._flip(claim)  # from here on the new plan is current
        except Exception as e:
            why = str(e) if isinstance(e, RolloutFailed | PlanConflict) else f"{type(e).__name__}: {e}"
            log.error("rollout %s aborted: %s", claim.rollout_id, why)
            if staged:
                for i, c in clients.items():
                    try:
                        c.abort(claim.to_version)
                    except grpc.RpcError as err:
                        log.warning("abort on shard %d: %s", i, err.details())
            try:
                self._store("log the abort", lambda: self.store.abort_rollout(claim, why))
            except Exception as err:  # the lock may have expired; the current plan is unchanged either way
                log.warning("abort_rollout: %s", err)
            self.events.publish(pb.PlanEvent(kind=pb.RESUME, plan_version=claim.from_version,
                                             rollout_id=claim.rollout_id))
            if scaled_from is not None:  # the shards it added own nothing: give them back
                self._scale(scaled_from, "the rollout aborted")
            self._finish(phase=pb.ABORTED, message=why,
                         pause_s=time.monotonic() - fenced_at if fenced_at is not None else 0.0)
            self._close(clients)
            return
        failpoints.hit("rollout.after_flip")
        errors = commit_all(clients, claim.to_version, step)
        message = "; ".join(errors)  # a shard that failed to flip needs recovery (restart from checkpoint)
        try:
            self._store("log the commit", lambda: self.store.log_committed(claim.rollout_id, message))
        except Exception as err:  # the plan is live either way; a restart commits the shards again (idempotent)
            log.warning("rollout %s: logging the commit: %s", claim.rollout_id, err)
        self.events.publish(pb.PlanEvent(kind=pb.RESUME, plan_version=claim.to_version, rollout_id=claim.rollout_id))
        if waited:
            message = "; ".join(filter(None, [f"waited {waited:.1f} s for Redis at the flip", message]))
        if not errors:
            self._scale_in(plan)
        self._finish(phase=pb.DONE, message=message, pause_s=time.monotonic() - fenced_at)
        self._close(clients)
        log.info("rollout %s done: version %d live, trainers paused %.3f s", claim.rollout_id, claim.to_version,
                 self.progress.pause_s)

    # -- shards a plan needs (ShardScaler) ----------------------------------------------------
    def _scale_up(self, plan: common_pb2.ShardingPlan) -> int | None:
        """More shards than run now: scale up, then wait for the new ones to register on standby. Returns the
        replica count before scaling (None: nothing scaled), so an abort can give the new shards back."""
        try:
            have = self.scaler.replicas() if self.scaler.elastic else None
        except ScalingError as e:
            raise RolloutFailed(str(e)) from None
        if have is None or have >= plan.num_shards:
            return None
        what = self.scaler.describe()
        self._update(message=f"scaling {what} from {have} to {plan.num_shards} shards")
        self._scale(plan.num_shards, f"plan version {plan.version} needs {plan.num_shards} shards", fail=True)
        wanted = list(range(plan.num_shards))
        deadline = time.monotonic() + self.settings.shard_wait_s
        while True:
            missing = [i for i in wanted if i not in self.membership.alive(pb.SHARD)]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise RolloutFailed(f"scaled {what} to {plan.num_shards}, but shards {missing} did not register "
                                    f"within {self.settings.shard_wait_s:.0f} s")
            self._update(message=f"scaled {what} to {plan.num_shards}: waiting for shards {missing} to register")
            time.sleep(0.2)
        self._update(message="")
        return have

    def _scale_in(self, plan: common_pb2.ShardingPlan) -> None:
        """After a committed rollout: removes the highest ordinals, which the new plan gives nothing."""
        try:
            have = self.scaler.replicas() if self.scaler.elastic else None
        except ScalingError as e:
            log.error("plan version %d is live, but scaling in was not possible: %s", plan.version, e)
            return
        if have is None:
            return
        keep = max([plan.num_shards, *(ps.shard + 1 for ps in plan.slices)])
        if keep < have:
            self._scale(keep, f"plan version {plan.version} needs only {keep} shards; shards "
                              f"{list(range(keep, have))} own nothing")

    def _scale(self, replicas: int, why: str, fail: bool = False) -> None:
        log.info("scaling %s to %d shards: %s", self.scaler.describe(), replicas, why)
        try:
            self.scaler.scale_to(replicas)
        except ScalingError as e:
            if fail:
                raise RolloutFailed(str(e)) from None
            log.error("%s", e)  # the plan is live either way; spare shards only cost resources

    def shard_client(self, address: str, plan_version: int) -> ShardClient:
        """A client carrying the coordinator's control-plane credentials (token; its certificate under mTLS)."""
        st = self.settings
        return ShardClient(address, plan_version=plan_version, timeout=st.rpc_timeout_s, tls_ca=st.tls_ca,
                           token=st.shard_token, tls_cert=st.tls_cert if st.tls_ca else None,
                           tls_key=st.tls_key if st.tls_ca else None)

    def busy(self) -> bool:
        """A rollout is running (recovery keeps out of its way)."""
        with self._lock:
            return self.progress.phase not in (pb.IDLE, *TERMINAL)

    def install(self, plan: common_pb2.ShardingPlan, shard: int, address: str) -> None:
        """Gives a standby shard (plan version 0: a replacement pod) its slices of the live `plan`, seeded;
        the trainers' resume restores them from the checkpoint."""
        with self.shard_client(address, 0) as c:
            c.prepare(assignment(plan, shard))
            c.commit(plan.version, -1)

    def _finish(self, **fields) -> None:
        self._update(**fields)
        if self.on_finish is not None:
            self.on_finish(self.snapshot())

    @staticmethod
    def _close(clients: dict[int, ShardClient]) -> None:
        for c in clients.values():
            c.close()

    def _await_fence(self, claim: RolloutClaim) -> int:
        """Waits until every alive trainer stopped at the same step boundary; -1 when no trainer runs."""
        deadline = time.monotonic() + self.settings.fence_timeout_s
        with self._lock:
            while True:
                trainers = set(self.membership.alive(pb.TRAINER))
                waiting = trainers - set(self._fenced)
                if not waiting:
                    break
                if time.monotonic() > deadline:
                    raise RolloutFailed(f"trainers {sorted(waiting)} did not fence within "
                                        f"{self.settings.fence_timeout_s:.0f} s")
                self._lock.wait(timeout=0.2)
            steps = {self._fenced[t] for t in trainers}
        if len(steps) > 1:
            raise RolloutFailed(f"trainers fenced at different steps {sorted(steps)}")
        return steps.pop() if steps else -1

    def _migrate(self, claim: RolloutClaim, moves: list[Move],
                 clients: dict[int, ShardClient], shards: dict[int, pb.Member], fenced_at: float) -> None:
        s = self.settings
        pieces = split_moves(moves, s.rows_per_pull)
        started = time.monotonic()
        done_bytes = done_rows = 0
        last_refresh = time.monotonic()

        def pull(m: Move) -> Move:
            req = embedding_shard_pb2.PullRowsRequest(
                plan_version=claim.to_version, source="" if m.local else shards[m.source_shard].address,
                source_plan_version=claim.from_version, source_slice=m.source_slice, row_start=m.row_start,
                row_end=m.row_end, src_col_start=m.src_col_start, num_cols=m.num_cols, dest_slice=m.dest_slice,
                dest_row_start=m.dest_row_start, dest_col_start=m.dest_col_start)
            resp = clients[m.dest_shard].pull_rows(req)
            if resp.rows != m.rows:
                raise RolloutFailed(f"table {m.table!r}: shard {m.dest_shard} pulled {resp.rows} of {m.rows} rows")
            return m

        pending: set = set()
        submitted_bytes = 0

        def drain(block: bool) -> None:
            nonlocal done_bytes, done_rows, last_refresh
            finished, _ = wait(pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
            for f in finished:
                pending.discard(f)
                try:
                    m = f.result()
                except grpc.RpcError as e:
                    raise RolloutFailed(f"migration failed: {e.code().name}: {e.details()}") from None
                done_rows += m.rows
                done_bytes += 0 if m.local else m.bytes
                self._update(bytes_done=done_bytes, rows_done=done_rows, pause_s=time.monotonic() - fenced_at)
            if time.monotonic() - last_refresh > 5:
                self._store("refresh the lock", lambda: self.store.refresh(claim))
                last_refresh = time.monotonic()

        with ThreadPoolExecutor(max_workers=s.pull_workers) as pool:
            try:
                for m in pieces:
                    if s.rate_limit_bytes_per_s and not m.local:  # pace pulls to the byte budget
                        due = started + submitted_bytes / s.rate_limit_bytes_per_s
                        while time.monotonic() < due:
                            drain(False)
                            time.sleep(min(0.05, max(0.0, due - time.monotonic())))
                        submitted_bytes += m.bytes
                    while len(pending) >= 2 * s.pull_workers:
                        drain(True)
                    pending.add(pool.submit(pull, m))
                    drain(False)
                while pending:
                    drain(True)
            finally:
                for f in pending:
                    f.cancel()

    # -- Redis going away ---------------------------------------------------------------------
    def _store(self, what: str, fn):
        """fn() against the store, retried while Redis is unreachable (restarting) for up to redis_wait_s."""
        deadline = time.monotonic() + self.settings.redis_wait_s
        warned = False
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise RolloutFailed(f"{what}: Redis unreachable for {self.settings.redis_wait_s:.0f} s: "
                                        f"{e}") from None
                if not warned:  # once; retried every 0.5 s
                    log.warning("%s: Redis unreachable (%s); retrying for up to %.0f s", what, e,
                                self.settings.redis_wait_s)
                    warned = True
                time.sleep(0.5)

    def _flip(self, claim: RolloutClaim) -> float:
        """store.commit_rollout, waiting out a Redis restart; returns the seconds waited. A retry after a
        lost connection may find the lock gone because the first EXEC did land: then the flip is done. Once a
        connection was lost, whether it landed is unknown until Redis answers, and aborting could contradict
        a landed flip: the trainers stay fenced until then (nothing else works without Redis either)."""
        started, lost = time.monotonic(), False

        def attempt() -> None:
            nonlocal lost
            try:
                self.store.commit_rollout(claim)
            except (redis.ConnectionError, redis.TimeoutError):
                lost = True
                raise
            except PlanConflict:
                if not (lost and self.store.current_version() == claim.to_version):
                    raise

        while True:
            try:
                self._store("flip the plan version", attempt)
                break
            except RolloutFailed as e:
                if not lost:
                    raise
                log.error("rollout %s: %s; the flip may have landed: waiting for Redis, trainers stay fenced",
                          claim.rollout_id, e)
        return time.monotonic() - started if lost else 0.0


def parallel(calls: dict, what: str) -> list[str]:
    """Runs {shard: fn} at once; the errors, one line per shard."""
    errors = []
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = {pool.submit(fn): i for i, fn in calls.items()}
        for f in as_completed(futures):
            try:
                f.result()
            except grpc.RpcError as e:
                errors.append(f"{what} on shard {futures[f]}: {e.code().name}: {e.details()}")
    return sorted(errors)


def commit_all(clients: dict[int, ShardClient], version: int, step: int) -> list[str]:
    """Commit on every shard (idempotent: a shard that already committed `version` answers OK)."""

    def commit(c: ShardClient) -> None:
        c.commit(version, step)
        failpoints.hit("rollout.commit_shard")

    return parallel({i: (lambda c=c: commit(c)) for i, c in clients.items()}, "Commit")
