"""Recovery: when a shard of the current plan dies during training, restart the job from the last
consistent checkpoint. The trainers stop, a replacement shard starts with the plan's slices, and the
trainers start again with --resume: rank 0 restores every shard (the survivors rewind too) and the
dense state, and the data stream continues where the checkpoint left it, so the run ends with the
model an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.client import CoordinatorClient
from coordinator.launcher import LocalShards, LocalTrainers
from protos import coordinator_pb2

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

    def dead_shards(self) -> list[int]:
        """Shards the current plan needs whose member missed its lease (or never registered)."""
        plan = self.client.get_plan()[0].plan
        alive = {m.id for m in self.client.members() if m.kind == pb.SHARD and m.state == pb.ALIVE}
        return [i for i in range(plan.num_shards) if i not in alive]

    def run(self, resume: bool = False) -> JobResult:
        self.trainers.start(resume=resume)
        while True:
            code = self.trainers.poll()
            dead = self.dead_shards()
            if dead:
                self._recover(dead)
                continue
            if code is not None:
                if code == 0:
                    return JobResult(self.restarts, self.recovered)
                time.sleep(2 * self.poll_s)  # a shard that just died may not have missed its lease yet
                if not self.dead_shards():
                    raise JobFailed(f"trainers exited with code {code}, every shard alive:\n"
                                    f"{self.trainers.stderr_tail()}")
            time.sleep(self.poll_s)

    def _recover(self, dead: list[int]) -> None:
        if self.restarts >= self.max_restarts:
            raise JobFailed(f"shards {dead} died again after {self.restarts} restarts")
        self.restarts += 1
        log.warning("shards %s dead: stopping the trainers and restarting the job from the last checkpoint", dead)
        self.trainers.stop()
        plan = self.client.get_plan()[0].plan
        has_checkpoint = self.checkpoint_dir is not None and (self.checkpoint_dir / "LATEST").exists()
        # no checkpoint yet: every shard starts over from the seeded initial rows
        for shard in dead if has_checkpoint else range(plan.num_shards):
            self.shards.start(shard, plan)
        self.recovered.extend(dead)
        deadline = time.monotonic() + self.wait_s
        while self.dead_shards():
            if time.monotonic() > deadline:
                raise JobFailed(f"replacement shards {self.dead_shards()} did not register within {self.wait_s} s")
            time.sleep(self.poll_s)
        log.info("replacement shards registered; trainers resume from %s",
                 "the last checkpoint" if has_checkpoint else "step 0")
        self.trainers.start(resume=has_checkpoint)
