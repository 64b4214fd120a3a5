"""The member side of the coordinator's membership protocol: register, then heartbeat within the lease.

Shards and trainers run one agent each. A coordinator that is down or restarted is not fatal: the agent
keeps trying and registers again when a heartbeat comes back `known = false`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import grpc

from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.channels import open_channel

log = logging.getLogger(__name__)


class MemberAgent:
    def __init__(self, coordinator: str, member: coordinator_pb2.Member,
                 state: Callable[[], tuple[int, int]], *, channel: grpc.Channel | None = None) -> None:
        """`state()` returns (plan_version, step) for each heartbeat."""
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="member-agent", daemon=True)

    def start(self, wait_s: float = 0.0) -> MemberAgent:
        self._thread.start()
        if wait_s and not self.registered.wait(wait_s):
            raise TimeoutError(f"could not register with the coordinator at {self.coordinator} within {wait_s}s")
        return self

    def stop(self, leave: bool = True) -> None:
        """Stops heartbeating; `leave` removes the membership at once (an orderly exit, not a death)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if leave and self.registered.is_set():
            try:
                self.stub.Leave(coordinator_pb2.LeaveRequest(kind=self.member.kind, id=self.member.id,
                                                             instance=self.member.instance), timeout=5)
            except grpc.RpcError as e:
                log.warning("leaving the coordinator at %s: %s", self.coordinator, e.details())
        self.channel.close()

    def _register(self) -> None:
        version, step = self.state()
        self.member.plan_version, self.member.step = version, step
        resp = self.stub.Register(coordinator_pb2.RegisterRequest(member=self.member), timeout=5)
        self.interval_s = min(0.5, max(0.05, resp.lease_ms / 1000 / 3))  # steps reach the coordinator soon
        self.registered.set()
        log.info("registered with the coordinator at %s as %s %d (lease %d ms)", self.coordinator,
                 coordinator_pb2.MemberKind.Name(self.member.kind), self.member.id, resp.lease_ms)

    def _run(self) -> None:
        known = False
        while not self._stop.is_set():
            try:
                if not known:
                    self._register()
                    known = True
                else:
                    version, step = self.state()
                    resp = self.stub.Heartbeat(coordinator_pb2.HeartbeatRequest(
                        kind=self.member.kind, id=self.member.id, instance=self.member.instance,
                        plan_version=version, step=step), timeout=5)
                    known = resp.known
            except grpc.RpcError as e:
                known = False
                log.warning("coordinator at %s: %s", self.coordinator, e.details())
            self._stop.wait(self.interval_s)
