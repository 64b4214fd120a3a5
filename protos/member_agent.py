"""The member side of the coordinator's membership protocol: register, then heartbeat within the lease.

Shards and trainers run one agent each. A coordinator that is down or restarted is not fatal: the agent
keeps trying and registers again when a heartbeat comes back `known = false`.

Fencing: the coordinator issues an epoch at Register; the agent sends it with every heartbeat and
re-registration. When the coordinator answers FAILED_PRECONDITION (a later epoch was issued for this id:
the member was replaced while it was frozen or partitioned), the agent stops for good and the member is
fenced: `check()` raises `Fenced` naming both epochs, and the member's write paths call it before
changing state. A process woken after a pause longer than its lease asks the coordinator before its
first write (`check()` heartbeats synchronously then), so no write slips in before the next heartbeat.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable

import grpc

from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.channels import open_channel

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 5.0  # one Register / Heartbeat
# Heartbeats every lease / 3 (Kubernetes renews node leases at a similar fraction), each wait drawn from
# +-JITTER of it so a fleet started together does not beat in step; the longest wait (0.37 lease) still
# leaves two beats per lease. No cap below that: the step and plan version a heartbeat carries are
# informational (status, tests), while fencing (`check()`) goes by the lease and plans by WatchPlan.
MIN_INTERVAL_S = 0.05
JITTER = 0.1


class Fenced(RuntimeError):
    """This member was replaced (the coordinator issued a later epoch for its id): it must not write."""


class MemberAgent:
    def __init__(self, coordinator: str, member: coordinator_pb2.Member,
                 state: Callable[[], tuple[int, int]], *, channel: grpc.Channel | None = None,
                 on_fenced: Callable[[str], None] | None = None) -> None:
        """`state()` returns (plan_version, step) for each heartbeat; `on_fenced(reason)` runs once when
        the coordinator refuses this member's epoch."""
        self.member = coordinator_pb2.Member()
        self.member.CopyFrom(member)
        if not self.member.instance:
            self.member.instance = uuid.uuid4().hex
        self.state = state
        self.channel = channel or open_channel(coordinator)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.coordinator = coordinator
        self.interval_s = 1.0
        self.registered = threading.Event()
        self.fenced = threading.Event()
        self.fenced_reason = ""
        self.on_fenced = on_fenced
        self.lease_s = 0.0  # from RegisterResponse; 0 until registered
        self._last_ack = 0.0  # monotonic send time of the last heartbeat / registration the coordinator accepted
        self._last_try = 0.0
        self._known = False
        self._unanswered = 0.0  # send time of the last heartbeat the coordinator did not answer (0: it answered)
        self._beat_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="member-agent", daemon=True)

    def start(self, wait_s: float = 0.0) -> MemberAgent:
        self._thread.start()
        if wait_s and not self.registered.wait(wait_s):
            if self.fenced.is_set():
                raise Fenced(self.fenced_reason)
            raise TimeoutError(f"could not register with the coordinator at {self.coordinator} within {wait_s}s")
        return self

    def stop(self, leave: bool = True) -> None:
        """Stops heartbeating; `leave` removes the membership at once (an orderly exit, not a death)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if leave and self.registered.is_set() and not self.fenced.is_set():
            try:
                self.stub.Leave(coordinator_pb2.LeaveRequest(kind=self.member.kind, id=self.member.id,
                                                             instance=self.member.instance), timeout=5)
            except grpc.RpcError as e:
                log.warning("leaving the coordinator at %s: %s", self.coordinator, e.details())
        self.channel.close()

    @property
    def epoch(self) -> int:
        """The epoch the coordinator issued (0: not registered yet, or a coordinator without epochs)."""
        return self.member.epoch

    def check(self) -> None:
        """Raises `Fenced` if this member was replaced. Called before every write: when the last accepted
        heartbeat is older than the lease (the process was frozen), it waits for the heartbeat in flight or
        sends one now, so a write never precedes the coordinator's verdict after a freeze. When the
        coordinator did not answer the last heartbeat, writes go on without asking (availability while it
        is down; the agent's thread keeps trying and fences on the first refusal)."""
        lapsed = self.lease_s and time.monotonic() - self._last_ack > self.lease_s
        # a heartbeat in flight (the agent's thread woke first) is waited for; a coordinator that did not
        # answer one sent after the lease lapsed is not waited for again (training goes on while it is down;
        # one sent before a freeze and timed out during it proves nothing)
        down = self._unanswered > self._last_ack + self.lease_s
        if (lapsed and not self.fenced.is_set() and not down
                and self._beat_lock.acquire(timeout=RPC_TIMEOUT_S)):
            try:
                now = time.monotonic()
                if now - self._last_ack > self.lease_s and now - self._last_try > self.interval_s:
                    self._beat_locked()
            finally:
                self._beat_lock.release()
        if self.fenced.is_set():
            raise Fenced(self.fenced_reason)

    def _register(self) -> None:
        version, step = self.state()
        self.member.plan_version, self.member.step = version, step
        sent = time.monotonic()
        resp = self.stub.Register(coordinator_pb2.RegisterRequest(member=self.member), timeout=RPC_TIMEOUT_S)
        self._unanswered = 0.0
        self.interval_s = max(MIN_INTERVAL_S, resp.lease_ms / 1000 / 3)
        self.lease_s = resp.lease_ms / 1000
        self.member.epoch = resp.epoch
        self._last_ack = sent
        self.registered.set()
        log.info("registered with the coordinator at %s as %s %d (epoch %d, lease %d ms)", self.coordinator,
                 coordinator_pb2.MemberKind.Name(self.member.kind), self.member.id, resp.epoch, resp.lease_ms)

    def _beat(self) -> None:
        """One heartbeat (or registration, when the coordinator does not know this member); shared by the
        agent's thread and `check()`."""
        with self._beat_lock:
            self._beat_locked()

    def _beat_locked(self) -> None:
        if self.fenced.is_set():
            return
        self._last_try = time.monotonic()
        try:
            if not self._known:
                self._register()
                self._known = True
                return
            version, step = self.state()
            sent = time.monotonic()
            resp = self.stub.Heartbeat(coordinator_pb2.HeartbeatRequest(
                kind=self.member.kind, id=self.member.id, instance=self.member.instance,
                plan_version=version, step=step, epoch=self.member.epoch), timeout=RPC_TIMEOUT_S)
            self._known, self._unanswered = resp.known, 0.0
            if resp.known:
                self._last_ack = sent
            else:  # the lease lapsed: register again at once (keeping the epoch), or learn it was replaced
                self._register()
                self._known = True
        except grpc.RpcError as e:
            self._known = False
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                self._fence(e.details() or "refused by the coordinator")
                return
            self._unanswered = self._last_try
            log.warning("coordinator at %s: %s", self.coordinator, e.details())

    def _fence(self, reason: str) -> None:
        self.fenced_reason = f"fenced by the coordinator at {self.coordinator}: {reason}"
        self.fenced.set()
        log.error("%s %d: %s", coordinator_pb2.MemberKind.Name(self.member.kind), self.member.id, self.fenced_reason)
        if self.on_fenced is not None:
            self.on_fenced(self.fenced_reason)

    def _run(self) -> None:
        while not self._stop.is_set() and not self.fenced.is_set():
            self._beat()
            self._stop.wait(self.interval_s * random.uniform(1 - JITTER, 1 + JITTER))
