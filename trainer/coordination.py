"""A trainer's link to the coordinator: membership, the current plan, and fences around rollouts.

The coordinator announces a rollout with FENCE on the WatchPlan stream. Every trainer stops at the same
step boundary (they agree through an all-reduce at each step), drains its updates, reports where it
stopped, and waits for RESUME, which names the plan version to continue with: the new one, or the old
one when the rollout aborted.

A coordinator killed while the trainers are fenced is not fatal: the report is retried and the plan
watch reconnects; the restarted coordinator finishes or aborts the rollout and replays its RESUME.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import grpc

from protos import common_pb2, coordinator_pb2
from protos.coordinator_client import CoordinatorClient
from protos.member_agent import MemberAgent

log = logging.getLogger(__name__)
pb = coordinator_pb2


class PlanFollower:
    def __init__(self, address: str, rank: int, *, tls_ca: str | None = None, wait_s: float = 60.0,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        self.address, self.rank = address, rank
        self.client = CoordinatorClient(address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self.plan_version, self.step = 0, -1
        self._cond = threading.Condition()
        self._fences: collections.deque[str] = collections.deque()  # FENCEd rollouts not yet handled here
        self._resumed: dict[str, pb.PlanEvent] = {}
        self._seen: set[str] = set()  # every FENCEd rollout (a reconnected stream replays the open one)
        self._done: set[str] = set()  # rollouts resumed here (a reconnected stream replays the last RESUME)
        self._unseen: tuple[int, pb.PlanEvent | None] = (0, None)  # (count, last) RESUMEs of rollouts never FENCEd here
        self._closed = False
        self._stream = None
        self.wait_s = wait_s
        self.agent = MemberAgent(address, pb.Member(kind=pb.TRAINER, id=rank),
                                 lambda: (self.plan_version, self.step), channel=self.client.channel)
        self._thread = threading.Thread(target=self._watch, name="plan-watch", daemon=True)

    def start(self) -> PlanFollower:
        self._thread.start()
        self.agent.start(wait_s=self.wait_s)
        return self

    def current_plan(self, version: int = 0) -> tuple[common_pb2.ShardingPlan, list[str]]:
        record, _ = self.client.get_plan(version)
        addresses = self.client.shard_addresses(record.plan, wait_s=self.wait_s)
        self.plan_version = record.plan.version
        return record.plan, addresses

    @property
    def fence_pending(self) -> bool:
        """A rollout asked the trainers to stop and has not resumed them yet."""
        with self._cond:
            while self._fences and self._fences[0] in self._resumed:  # fenced and resumed (aborted) meanwhile
                self._done.add(self._fences[0])
                self._resumed.pop(self._fences.popleft())
            return bool(self._fences)

    def fence(self, step: int, timeout_s: float = 3600.0) -> pb.PlanEvent:
        """Reports this trainer stopped after `step` and blocks until the rollout resumes it. (Another
        trainer may have seen the FENCE first: all stop at the same step, so this one waits for it.)"""
        with self._cond:
            seen = self._unseen[0]
            if not self._cond.wait_for(lambda: self._fences or self._unseen[0] != seen, timeout=60):
                raise RuntimeError("fence: no FENCE event from the coordinator")
            if not self._fences:  # the coordinator died before this trainer got the FENCE a peer stopped for;
                resumed = self._unseen[1]  # its successor ended that rollout: continue as the peer will
                self._done.add(resumed.rollout_id)
                log.warning("trainer %d: rollout %s ended before its FENCE arrived here", self.rank,
                            resumed.rollout_id)
                return resumed
            rollout = self._fences.popleft()
            if rollout in self._resumed:  # it already ended (aborted) before this trainer stopped
                self._done.add(rollout)
                return self._resumed.pop(rollout)
        self.step = step
        deadline = time.monotonic() + timeout_s
        self._report(rollout, step, deadline)
        log.info("trainer %d fenced after step %d for rollout %s", self.rank, step, rollout)
        with self._cond:
            if not self._cond.wait_for(lambda: rollout in self._resumed, timeout=deadline - time.monotonic()):
                raise RuntimeError(f"rollout {rollout}: no RESUME within {timeout_s:.0f} s")
            self._done.add(rollout)
            return self._resumed.pop(rollout)

    def _report(self, rollout: str, step: int, deadline: float) -> None:
        """ReportFenced, retried while the coordinator is unreachable (killed: its successor answers that
        the rollout is no longer fencing, and replays the RESUME that ended it)."""
        warned = False
        while True:
            try:
                self.client.report_fenced(self.rank, rollout, step)
                return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the rollout moved on: its RESUME follows
                    log.warning("rollout %s no longer fencing: %s", rollout, e.details())
                    return
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                with self._cond:
                    if rollout in self._resumed:
                        return
                if time.monotonic() > deadline:
                    raise
                if not warned:  # once: the retries go on every 0.5 s until the coordinator answers
                    log.warning("reporting the fence of rollout %s: %s; retrying", rollout, e.details())
                    warned = True
                time.sleep(0.5)

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()
        self.agent.stop()  # closes the channel it shares with the client

    def _watch(self) -> None:
        backoff = 0.2
        while not self._closed:
            try:
                self._stream = self.client.watch_plan(self.rank)
                for event in self._stream:
                    backoff = 0.2
                    with self._cond:
                        if event.kind == pb.FENCE and event.rollout_id not in self._seen:
                            self._seen.add(event.rollout_id)
                            self._fences.append(event.rollout_id)
                        elif event.kind == pb.RESUME and event.rollout_id not in self._done:
                            if event.rollout_id in self._seen:
                                self._resumed[event.rollout_id] = event
                            else:
                                self._unseen = (self._unseen[0] + 1, event)
                        self._cond.notify_all()
            except grpc.RpcError as e:
                if self._closed:
                    return
                log.warning("plan watch on %s: %s; reconnecting", self.address, e.details())
            time.sleep(backoff)
            backoff = min(5.0, backoff * 2)
