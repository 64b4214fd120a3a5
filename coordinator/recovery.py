"""A job run as local processes, and its recovery.

When a shard of the current plan dies during training, the job restarts from the last consistent
checkpoint: the trainers stop, a replacement shard starts with the plan's slices, and the trainers
start again with --resume. Rank 0 restores every shard (the survivors rewind too) and the dense state,
and the data stream continues where the checkpoint left it, so the run ends with the model an
uninterrupted run would have.

`LocalJob` is what `coordinator job` runs: it brings the shards up (with the live plan's slices, or on
standby with an initial plan rolled out to them), then supervises the trainers until they finish.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from coordinator.launcher import LocalShards, LocalTrainers
from protos import common_pb2, coordinator_pb2
from protos.coordinator_client import CoordinatorClient, final

log = logging.getLogger(__name__)
pb = coordinator_pb2


class JobFailed(RuntimeError):
    """The job cannot finish: trainers failed with every shard alive, or restarts ran out."""


@dataclass
class JobResult:
    restarts: int
    recovered_shards: list[int]


class JobSupervisor:
    def __init__(self, client: CoordinatorClient, shards: LocalShards, trainers: LocalTrainers, *,
                 checkpoint_dir: str | Path | None, poll_s: float = 0.25, max_restarts: int = 3,
                 wait_s: float = 120.0) -> None:
        self.client, self.shards, self.trainers = client, shards, trainers
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.poll_s, self.max_restarts, self.wait_s = poll_s, max_restarts, wait_s
        self.recovered: list[int] = []
        self.restarts = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ends `run` (from another thread) at its next poll."""
        self._stop.set()

    def dead_shards(self) -> list[int]:
        """Shards the current plan needs whose process exited (seen at once, as the Kubernetes supervisor
        sees a deleted pod) or whose member missed its lease (a frozen shard), or never registered.

        The exit matters: trainers can fail on a killed shard within milliseconds (a refused connection
        during a checkpoint), long before its lease runs out, and must not be taken for a failed job."""
        plan = self.client.get_plan()[0].plan
        alive = {m.id for m in self.client.members() if m.kind == pb.SHARD and m.state == pb.ALIVE}
        exited = {i for i, p in self.shards.procs.items() if p.proc.poll() is not None}
        return [i for i in range(plan.num_shards) if i not in alive or i in exited]

    def _epochs(self) -> dict[int, int]:
        """Each shard id's epoch: a replacement process registers with a higher one."""
        return {m.id: m.epoch for m in self.client.members() if m.kind == pb.SHARD}

    def _waiting(self, restarted: list[int], held: dict[int, int]) -> list[int]:
        """Plan shards still dead, and restarted ones whose replacement has not registered (epoch unchanged)."""
        epochs = self._epochs()
        return sorted(set(self.dead_shards()) | {i for i in restarted if epochs.get(i, 0) <= held.get(i, 0)})

    def run(self, resume: bool = False) -> JobResult:
        self.trainers.start(resume=resume)
        while not self._stop.is_set():
            code = self.trainers.poll()
            dead = self.dead_shards()
            if dead:
                self._recover(dead)
                continue
            if code is not None:
                if code == 0:
                    return JobResult(self.restarts, self.recovered)
                time.sleep(2 * self.poll_s)  # the trainers may have seen a shard die before this poll did
                if not self.dead_shards():
                    raise JobFailed(f"trainers exited with code {code}, every shard alive:\n"
                                    f"{self.trainers.stderr_tail()}")
            time.sleep(self.poll_s)
        raise JobFailed("stopped")

    def _recover(self, dead: list[int]) -> None:
        if self.restarts >= self.max_restarts:
            raise JobFailed(f"shards {dead} died again after {self.restarts} restarts")
        self.restarts += 1
        log.warning("shards %s dead: stopping the trainers and restarting the job from the last checkpoint", dead)
        self.trainers.stop()
        plan = self.client.get_plan()[0].plan
        has_checkpoint = self.checkpoint_dir is not None and (self.checkpoint_dir / "LATEST").exists()
        # no checkpoint yet: every shard starts over from the seeded initial rows
        restarted = list(dead) if has_checkpoint else list(range(plan.num_shards))
        held = self._epochs()  # a killed shard's record can look ALIVE until its lease runs out
        for shard in restarted:
            self.shards.start(shard, plan)
        self.recovered.extend(dead)
        deadline = time.monotonic() + self.wait_s
        while waiting := self._waiting(restarted, held):
            if time.monotonic() > deadline:
                raise JobFailed(f"replacement shards {waiting} did not register within {self.wait_s} s")
            time.sleep(self.poll_s)
        log.info("replacement shards registered; trainers resume from %s",
                 "the last checkpoint" if has_checkpoint else "step 0")
        self.trainers.start(resume=has_checkpoint)


@dataclass
class LocalJob:
    """A training job of local shard and trainer processes under one coordinator (the embedded default)."""

    coordinator: str
    config: str
    trainers: int
    train_args: list[str] = field(default_factory=list)
    workdir: Path = Path("runs/job")
    checkpoint_dir: str | None = None
    seed: int = 0
    max_restarts: int = 3
    initial_plan: common_pb2.ShardingPlan | None = None  # for a coordinator that holds no plan yet
    wait_s: float = 120.0

    def run(self, client: CoordinatorClient) -> JobResult:
        """Runs the job to its end (JobFailed when it cannot finish); every process stops before return."""
        shards = LocalShards(self.coordinator, self.workdir, num_trainers=self.trainers, seed=self.seed,
                             checkpoint_root=self.checkpoint_dir)
        train_args = [*self.train_args, *(["--checkpoint-dir", self.checkpoint_dir] if self.checkpoint_dir else [])]
        trainers = LocalTrainers(self.coordinator, self.config, self.trainers, train_args, self.workdir)
        try:
            self.start_shards(client, shards)
            supervisor = JobSupervisor(client, shards, trainers, checkpoint_dir=self.checkpoint_dir,
                                       max_restarts=self.max_restarts, wait_s=self.wait_s)
            return supervisor.run()
        finally:
            trainers.stop()
            shards.stop_all()

    def start_shards(self, client: CoordinatorClient, shards: LocalShards) -> common_pb2.ShardingPlan:
        """The live plan's shards with their slices; with no live plan, standby shards that the initial
        plan is then rolled out to (so its first version is applied like any other)."""
        try:
            plan = client.get_plan()[0].plan
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            if self.initial_plan is None:
                raise JobFailed("the coordinator holds no plan yet: give --plan") from None
            plan = self.initial_plan
            for i in range(plan.num_shards):
                shards.start(i, None)  # standby: the first rollout initialises them
            client.wait_shards(list(range(plan.num_shards)), wait_s=self.wait_s)
            done = final(client.apply(plan, author="coordinator job", reason="initial plan"))
            if done.phase != pb.DONE:
                raise JobFailed(f"initial plan: {done.message}") from None
            return client.get_plan()[0].plan
        for i in range(plan.num_shards):
            shards.start(i, plan)
        return plan
