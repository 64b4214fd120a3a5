"""Recovery on Kubernetes, where no launcher of ours starts processes: the StatefulSet restarts a shard
pod, the trainers' Indexed Job restarts trainer pods, and the coordinator only decides what the new pod
holds, and when.

A shard of the current plan is *lost* when its member misses its lease, when its pod is deleted or
stops being Ready, or when a new process registers for its id on standby (plan version 0: a restarted
pod, faster than the lease). The trainers running at that moment cannot go on: every step looks up
every shard, so each of them fails (UNAVAILABLE after the transport's retries, or FAILED_PRECONDITION
from the standby replacement, which serves plan version 0) and exits, and its Job restarts it with
`--resume`. Once those trainer processes are gone (their members dead or replaced by new instances) and
the replacement has registered on standby, the coordinator gives it its slices of the current plan at
the current version (Prepare + Commit of the plan's assignment, rows seeded). It never does this while a
trainer that ran against the lost shard is alive: such a trainer could otherwise step on freshly seeded
rows. The restarted trainers resume exactly as under `coordinator job`: rank 0 restores every shard
(the replacement's slices, and the survivors, rewound) and the dense state from the last consistent
checkpoint, and the data stream continues from the checkpoint's position.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from coordinator.kubernetes import ShardPod
from coordinator.membership import Membership
from coordinator.plan_store import PlanStore
from coordinator.rollout import RolloutEngine
from protos import coordinator_pb2
from protos.shard_client import ShardClient

log = logging.getLogger(__name__)
pb = coordinator_pb2


class LossCause(enum.Enum):
    LEASE = "missed its lease"
    UNREGISTERED = "is not registered"
    POD = "lost its pod"
    REPLACED = "is a process on standby (a new or restarted pod) that the plan gives slices"


class Stage(enum.Enum):
    WAITING_REPLACEMENT = "waiting for the StatefulSet to restart the pod and the shard to register on standby"
    WAITING_TRAINERS = "waiting for the trainers that ran against it to exit (their Job restarts them)"


@dataclass
class LostShard:
    shard_id: int
    cause: LossCause
    since: float
    trainers: dict[int, str]  # trainer id -> instance alive when the loss was seen
    instance: str = ""  # the shard process that was lost ("" when none was registered)
    pod_uid: str = ""  # LossCause.POD: the pod that went away or became unready
    stage: Stage = Stage.WAITING_REPLACEMENT
    logged: set[str] = field(default_factory=set)  # messages already logged for this loss


class ClusterRecovery:
    """Watches the current plan's shards and brings a replaced one back (see the module docstring)."""

    def __init__(self, store: PlanStore, membership: Membership, rollouts: RolloutEngine, *, poll_s: float = 0.5,
                 trainer_exit_timeout_s: float = 120.0, startup_grace_s: float | None = None,
                 tls_ca: str | None = None, pods: Callable[[], dict[int, ShardPod]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.membership, self.rollouts = store, membership, rollouts
        self.pods = pods  # the pod watcher's view (ordinal -> pod), when there is one
        self.poll_s, self.trainer_exit_timeout_s, self.tls_ca = poll_s, trainer_exit_timeout_s, tls_ca
        self.clock = clock
        # a shard that has not registered yet is not lost while the job is coming up (two leases)
        self.startup_grace_s = 2 * membership.lease_s if startup_grace_s is None else startup_grace_s
        self.started_at = clock()
        self.lost: dict[int, LostShard] = {}
        self.recovered: list[int] = []  # shard ids brought back, in order (tests, logs)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-recovery", daemon=True)

    def start(self) -> ClusterRecovery:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception:  # Redis or a shard hiccup: the next pass tries again; recovery never dies
                log.exception("recovery pass failed")

    def on_pod_change(self, kind: str, pod: ShardPod) -> None:
        """From the pod watcher: a deleted or unready pod of a plan shard is a loss before any lease runs out."""
        if kind != "DELETED" and pod.ready and not pod.deleting:
            return
        if kind != "DELETED" and self.clock() - self.started_at < self.startup_grace_s:
            return  # pods still coming up with the job
        record = self.store.current()
        if record is None or pod.shard_id not in {ps.shard for ps in record.plan.slices}:
            return
        member = self.membership.get(pb.SHARD, pod.shard_id)
        with self._lock:
            if pod.shard_id not in self.lost:
                state = f"{pod.phase}, terminating" if pod.deleting else pod.phase
                lost = self._lose(pod.shard_id, LossCause.POD, self._alive_trainers(),
                                  member.instance if member else "", f"pod {pod.name} {kind.lower()} ({state})")
                lost.pod_uid = pod.uid

    def _alive_trainers(self) -> dict[int, str]:
        return {m.id: m.instance for m in self.membership.members(pb.TRAINER) if m.state == pb.ALIVE}

    def _lose(self, shard: int, cause: LossCause, trainers: dict[int, str], instance: str = "",
              detail: str = "") -> LostShard:
        lost = LostShard(shard, cause, self.clock(), trainers, instance)
        self.lost[shard] = lost
        if trainers:
            log.warning("shard %d %s%s: the job goes back to its last consistent checkpoint (trainers %s exit and "
                        "are restarted by their Job with --resume)", shard, cause.value,
                        f" ({detail})" if detail else "", sorted(trainers))
        else:  # also how standby shards of a fresh cluster get the initial plan (serve --initial-plan)
            log.warning("shard %d %s%s: it gets its slices once it registers on standby", shard, cause.value,
                        f" ({detail})" if detail else "")
        return lost

    def check(self) -> list[int]:
        """One pass; returns the shards given their slices in it."""
        if self.rollouts.busy():
            return []  # a rollout owns the shards now; its own failure handling applies
        record = self.store.current()
        if record is None:
            return []
        plan = record.plan
        owners = sorted({ps.shard for ps in plan.slices})
        shards = {m.id: m for m in self.membership.members(pb.SHARD)}
        trainers = self._alive_trainers()
        done = []
        with self._lock:
            for sid in list(self.lost):
                if sid not in owners:  # a rollout since moved everything off it
                    del self.lost[sid]
            for sid in owners:
                m = shards.get(sid)
                lost = self.lost.get(sid)
                if m is None and self.clock() - self.started_at < self.startup_grace_s:
                    continue
                if m is None or m.state == pb.DEAD:
                    if lost is None:
                        self._lose(sid, LossCause.UNREGISTERED if m is None else LossCause.LEASE, trainers,
                                   m.instance if m is not None else "")
                    continue
                if m.plan_version == plan.version:
                    if lost is not None and lost.cause == LossCause.POD and not self._pod_back(lost):
                        continue  # the lost process's lease has not run out yet: wait for its replacement
                    if lost is not None:
                        log.info("shard %d is serving plan version %d again", sid, plan.version)
                        del self.lost[sid]
                    continue
                if m.plan_version != 0:
                    self._once(lost, f"v{m.plan_version}", "shard %d serves plan version %d, not the current %d: "
                               "left alone (restart its pod to recover it)", sid, m.plan_version, plan.version)
                    continue
                if lost is None:
                    if self._live_version(m.address) == plan.version:
                        continue  # a heartbeat from before the shard's last Commit: it serves the plan
                    lost = self._lose(sid, LossCause.REPLACED, trainers, m.instance)
                if self._install_when_trainers_gone(lost, plan, m, trainers):
                    done.append(sid)
        return done

    def _install_when_trainers_gone(self, lost: LostShard, plan, member: pb.Member, trainers: dict[int, str]) -> bool:
        running = sorted(t for t, instance in lost.trainers.items() if trainers.get(t) == instance)
        if running:
            lost.stage = Stage.WAITING_TRAINERS
            self._once(lost, "trainers", "shard %d: replacement at %s registered; waiting for trainers %s (which ran "
                       "against the lost shard) to exit before giving it its slices", lost.shard_id, member.address,
                       running)
            if self.clock() - lost.since > self.trainer_exit_timeout_s:
                self._once(lost, "timeout", "shard %d: trainers %s still alive %.0f s after the loss; a trainer that "
                           "does not exit keeps the shard from being recovered (check its pod, or delete it)",
                           lost.shard_id, running, self.clock() - lost.since, level=logging.ERROR)
            return False
        try:
            live = self._live_version(member.address, raise_errors=True)
            if live not in (0, plan.version):
                self._once(lost, f"live{live}", "shard %d at %s serves plan version %d, neither standby nor the "
                           "current %d: left alone", lost.shard_id, member.address, live, plan.version)
                return False
            if live == 0:
                self.rollouts.install(plan, lost.shard_id, member.address)
        except grpc.RpcError as e:
            self._once(lost, f"rpc:{e.code().name}", "shard %d at %s: giving it plan version %d failed: %s: %s "
                       "(retrying)", lost.shard_id, member.address, plan.version, e.code().name, e.details(),
                       level=logging.ERROR)
            return False
        del self.lost[lost.shard_id]
        self.recovered.append(lost.shard_id)
        log.warning("shard %d recovered at %s: it holds its slices of plan version %d (seeded); the restarted "
                    "trainers restore every shard from the last consistent checkpoint (%.1f s after the loss)",
                    lost.shard_id, member.address, plan.version, self.clock() - lost.since)
        return True

    def _live_version(self, address: str, raise_errors: bool = False) -> int | None:
        """The plan version the shard itself serves (membership lags by a heartbeat); None if it does not answer."""
        try:
            with ShardClient(address, plan_version=0, timeout=10, tls_ca=self.tls_ca) as c:
                return c.info().plan_version
        except grpc.RpcError:
            if raise_errors:
                raise
            return None

    def _pod_back(self, lost: LostShard) -> bool:
        """The very pod that became unready is Ready again (a flap): its process kept its state."""
        pod = self.pods().get(lost.shard_id) if self.pods is not None else None
        return pod is not None and pod.uid == lost.pod_uid and pod.ready and not pod.deleting

    @staticmethod
    def _once(lost: LostShard | None, key: str, msg: str, *args, level: int = logging.WARNING) -> None:
        if lost is not None:
            if key in lost.logged:
                return
            lost.logged.add(key)
        log.log(level, msg, *args)
