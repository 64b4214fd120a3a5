"""The Coordinator gRPC servicer: membership, plans, plan events and rollouts over the store in Redis."""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import threading
import time
from collections.abc import Iterator

import grpc
import redis

from coordinator.events import PlanEvents
from coordinator.membership import Membership, StaleEpoch
from coordinator.metrics import CoordinatorMetrics
from coordinator.plan_store import PlanNotFound, PlanStore
from coordinator.rollout import RolloutEngine, RolloutRefused, RolloutSettings
from coordinator.scaling import ShardScaler
from protos import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)
pb = coordinator_pb2
MAX_WATCHERS = 1024  # WatchPlan streams held at once (each holds a server thread while it is open)
VERSION_TTL_S = 0.5  # how stale a heartbeat's reported plan version may be
UNARY_CONCURRENCY = 64  # unary RPCs running at once (the rest wait their turn, not for a Redis connection)


class TooManyWatchers(Exception):
    """Every WatchPlan slot is taken: RESOURCE_EXHAUSTED, so streams never take the unary RPCs' threads."""


@contextlib.contextmanager
def _served(servicer: CoordinatorServicer, method: str, context: grpc.ServicerContext) -> Iterator[None]:
    start, code = time.perf_counter(), "OK"
    try:
        yield
    except RolloutRefused as e:
        code = e.code.name
        context.abort(e.code, e.message)
    except StaleEpoch as e:  # a replaced member: it must stop, not register again
        code = "FAILED_PRECONDITION"
        log.warning("refused %s: %s", method, e)
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except TooManyWatchers as e:
        code = "RESOURCE_EXHAUSTED"
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except PlanNotFound as e:
        code = "NOT_FOUND"
        context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0] if e.args else e))
    except ValueError as e:
        code = "INVALID_ARGUMENT"
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except (redis.ConnectionError, redis.TimeoutError) as e:  # Redis down or restarting (loading its AOF)
        # the coordinator keeps serving: redis-py reconnects on the next call once Redis is back
        code = "UNAVAILABLE"
        log.warning("%s: Redis unavailable: %s", method, e)
        context.abort(grpc.StatusCode.UNAVAILABLE,
                      f"{method}: the coordinator's Redis is unavailable ({e}); retry once it is back")
    finally:
        servicer.metrics.rpc_done(method, code, time.perf_counter() - start)


def rpc(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        with self.unary_slots, _served(self, method.__name__, context):
            return method(self, request, context)

    return wrapper


def stream_rpc(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        with _served(self, method.__name__, context):
            yield from method(self, request, context)

    return wrapper


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, store: PlanStore, membership: Membership, metrics: CoordinatorMetrics | None = None,
                 settings: RolloutSettings | None = None, scaler: ShardScaler | None = None,
                 max_watchers: int = MAX_WATCHERS) -> None:
        self.store, self.membership = store, membership
        self.max_watchers = max_watchers
        self._watch_slots = threading.BoundedSemaphore(max_watchers)
        self.unary_slots = threading.BoundedSemaphore(UNARY_CONCURRENCY)
        self._version, self._version_read_at = 0, float("-inf")
        self.metrics = metrics or CoordinatorMetrics()
        self.events = PlanEvents()
        self.rollouts = RolloutEngine(store, membership, self.events, settings, on_finish=self._rollout_finished,
                                      scaler=scaler)

    def _rollout_finished(self, progress: pb.RolloutProgress) -> None:
        self.metrics.rollouts.labels(pb.RolloutPhase.Name(progress.phase)).inc()
        self.metrics.rollout_pause.observe(progress.pause_s)
        self.metrics.migrated_bytes.inc(progress.bytes_done)
        self.metrics.plan_version.set(self.store.current_version())

    # -- membership ---------------------------------------------------------------------------
    @rpc
    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        m = request.member
        if m.kind not in (pb.SHARD, pb.TRAINER):
            raise ValueError(f"member.kind: expected SHARD or TRAINER, got {m.kind}")
        if m.id < 0:
            raise ValueError(f"member.id: must be >= 0, got {m.id}")
        if m.kind == pb.SHARD and not m.address:
            raise ValueError("member.address: a shard must say where it serves")
        if not m.instance:
            raise ValueError("member.instance: empty")
        epoch = self.membership.register(m)
        log.info("registered %s %d at %s (instance %s, epoch %d, plan version %d)", pb.MemberKind.Name(m.kind), m.id,
                 m.address or "-", m.instance[:8], epoch, m.plan_version)
        self._count_members()
        return pb.RegisterResponse(lease_ms=int(self.membership.lease_s * 1000),
                                   plan_version=self.store.current_version(), epoch=epoch)

    @rpc
    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        known = self.membership.heartbeat(request.kind, request.id, request.instance, request.plan_version,
                                          request.step, epoch=request.epoch)
        return pb.HeartbeatResponse(known=known, plan_version=self._recent_version())

    def _recent_version(self) -> int:
        """The current plan version, read from Redis at most every VERSION_TTL_S: heartbeats only report it
        (members learn plan changes from WatchPlan / GetPlan), and a read per beat is a third of a
        heartbeat's Redis traffic at fleet size."""
        now = time.monotonic()
        if now - self._version_read_at > VERSION_TTL_S:
            self._version, self._version_read_at = self.store.current_version(), now
        return self._version

    @rpc
    def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        member = self.membership.get(request.kind, request.id)
        removed = member is not None and hmac.compare_digest(member.instance.encode(), request.instance.encode())
        if removed:
            self.membership.remove(request.kind, request.id)
            log.info("%s %d left", pb.MemberKind.Name(request.kind), request.id)
            self._count_members()
        return pb.LeaveResponse(removed=removed)

    @rpc
    def ListMembers(self, request, context) -> pb.ListMembersResponse:
        members = self.membership.members()
        self._count_members(members)
        listed = []
        for m in members:  # `instance` is each member's credential for Heartbeat and Leave: never listed
            copy = pb.Member()
            copy.CopyFrom(m)
            copy.ClearField("instance")
            listed.append(copy)
        return pb.ListMembersResponse(members=listed)

    def _count_members(self, members=None) -> None:
        members = self.membership.members() if members is None else members
        for kind in (pb.SHARD, pb.TRAINER):
            for state in (pb.ALIVE, pb.DEAD):
                n = sum(1 for m in members if m.kind == kind and m.state == state)
                self.metrics.members.labels(pb.MemberKind.Name(kind), pb.MemberState.Name(state)).set(n)

    # -- plans --------------------------------------------------------------------------------
    @rpc
    def GetPlan(self, request: pb.GetPlanRequest, context) -> pb.GetPlanResponse:
        if request.version:
            record = self.store.get(request.version)
        else:
            record = self.store.current()
            if record is None:
                raise PlanNotFound("no current plan: apply one first (coordinator plan apply)")
        shards = self.membership.alive(pb.SHARD)
        return pb.GetPlanResponse(record=record, shard_addresses={i: m.address for i, m in shards.items()})

    @stream_rpc
    def WatchPlan(self, request: pb.WatchPlanRequest, context) -> Iterator[pb.PlanEvent]:
        if not self._watch_slots.acquire(blocking=False):
            raise TooManyWatchers(f"WatchPlan: {self.max_watchers} streams are open already (the coordinator's "
                                  f"max_watchers); retry later")
        try:
            current = pb.PlanEvent(kind=pb.CURRENT, plan_version=self.store.current_version())
            yield from self.events.subscribe(current, context.is_active)
        finally:
            self._watch_slots.release()

    @rpc
    def ReportFenced(self, request: pb.ReportFencedRequest, context) -> pb.ReportFencedResponse:
        self.rollouts.report_fenced(request.trainer_id, request.rollout_id, request.step)
        return pb.ReportFencedResponse()

    @rpc
    def PlanHistory(self, request: pb.PlanHistoryRequest, context) -> pb.PlanHistoryResponse:
        return pb.PlanHistoryResponse(current_version=self.store.current_version(),
                                      records=self.store.history(request.limit))

    @rpc
    def ValidatePlan(self, request: pb.ValidatePlanRequest, context) -> pb.ValidatePlanResponse:
        return pb.ValidatePlanResponse(violations=self.rollouts.validate(request.plan, self.store.current()))

    @rpc
    def RolloutStatus(self, request, context) -> pb.RolloutProgress:
        return self.rollouts.snapshot()

    # -- admin (bearer token, checked by the interceptor) -------------------------------------
    @stream_rpc
    def ApplyPlan(self, request: pb.ApplyPlanRequest, context) -> Iterator[pb.RolloutProgress]:
        if not request.plan.tables:
            raise ValueError("plan: no tables")
        rollout_id = self.rollouts.start(request.plan, request.base_version, request.author or "unknown",
                                         request.reason)
        yield from self.rollouts.watch(rollout_id, context.is_active)

    @stream_rpc
    def Rollback(self, request: pb.RollbackRequest, context) -> Iterator[pb.RolloutProgress]:
        current = self.store.current()
        if current is None or not current.parent_version:
            raise RolloutRefused(grpc.StatusCode.FAILED_PRECONDITION,
                                 "rollback: the current plan has no previous version")
        previous = self.store.get(current.parent_version)
        reason = request.reason or f"rollback to version {previous.plan.version}"
        rollout_id = self.rollouts.start(previous.plan, current.plan.version, request.author or "unknown", reason)
        yield from self.rollouts.watch(rollout_id, context.is_active)
