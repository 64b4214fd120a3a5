"""A training job, from its settings to its last step: the loop that `trainer train` runs.

Besides the step itself (`trainer.train.ShardedTrainer`), a job owns what happens between steps:
resuming from the newest checkpoint, the checkpoint cadence, stopping every trainer at the same step
boundary on SIGTERM, and following the coordinator's rollouts (fence, switch to the new plan,
checkpoint at once). `trainer/cli.py` only maps flags onto `JobSettings`.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from protos.model_config import ModelConfig
from protos.plan import load_plan
from trainer import checkpoint
from trainer.batch import Batch
from trainer.data import HELDOUT, SyntheticData
from trainer.train import ShardedTrainer, evaluate, init_distributed

log = logging.getLogger("trainer")
WIRE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class JobError(ValueError):
    """Settings that cannot run; the message names the flag."""


class TrainerGroupError(RuntimeError):
    """A collective of the trainers' own group (DDP's gradient all-reduce and buffer broadcast, the
    step-boundary agreement, checkpoint barriers) failed: another trainer died or hung. gloo says so in
    a 40-line traceback ending in its source path; this says which rank saw it, after which step, and
    what to do."""


def lost_peer(e: BaseException) -> bool:
    """True for the error gloo or NCCL raise when a peer's connection closes or the group times out."""
    return isinstance(e, torch.distributed.DistError) or (type(e) is RuntimeError and "/gloo/" in str(e))


def backend_reason(e: BaseException) -> str:
    """gloo's first line without its source path and its boilerplate advice."""
    line = (str(e).strip().splitlines() or [repr(e)])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", line).split(". This is typically", 1)[0].rstrip(".")


@dataclass
class JobSettings:
    """Everything a trainer process needs; rank and world size come from torchrun's environment."""

    config: str
    plan: str | None = None
    shards: list[str] | None = None
    coordinator: str | None = None
    data: str = "synthetic"  # or criteo:PATH[,PATH...]
    transport: str = "grpc"  # or collective
    collective_timeout_s: float | None = None  # collective: no exchange waits longer for a peer (None: 300 s)
    rpc_timeout_s: float = 120.0  # deadline of every shard RPC
    tls_ca: str | None = None
    tls_cert: str | None = None  # this trainer's certificate, for servers that require mutual TLS
    tls_key: str | None = None
    token: str | None = None  # the shards' control-plane token (Checkpoint / Restore)
    strict: bool = False
    data_workers: int = 0
    steps: int = 100
    batch_size: int = 256  # global, split over the trainers
    first_step: int = 0
    seed: int = 0
    wire: str = "fp32"
    out: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    resume_if_present: bool = False  # resume when the checkpoint dir holds one (a restarted pod), else start
    async_staleness: int = 0
    pipelined: bool = True
    logdir: str | None = None
    eval_every: int = 0
    eval_batches: int = 4
    publish_dense: str | None = None  # Redis URL: the dense parameters go out every `dense_every` steps
    dense_every: int = 50
    json: bool = False
    rank: int = 0
    world: int = 1

    def check(self) -> None:
        """Refuses contradictory settings before anything starts."""
        if self.batch_size % self.world:
            raise JobError(f"--batch-size {self.batch_size} is not divisible by WORLD_SIZE {self.world}")
        if self.data != "synthetic" and not self.data.startswith("criteo:"):
            raise JobError(f"--data {self.data!r}: expected synthetic or criteo:PATH[,PATH...]")
        if self.data != "synthetic" and self.eval_every:
            raise JobError("--eval-every: held-out evaluation needs --data synthetic (the teacher's held-out stream)")
        if (self.resume or self.resume_if_present) and not self.checkpoint_dir:
            raise JobError("--resume needs --checkpoint-dir")
        if self.wire not in WIRE:
            raise JobError(f"--wire {self.wire!r}: expected one of {list(WIRE)}")
        if self.coordinator:
            if self.plan or self.shards:
                raise JobError("--coordinator gives the plan and the shards: drop --plan and --shards")
            if self.transport == "collective":
                raise JobError("--coordinator: live re-sharding needs --transport grpc")
        elif not (self.plan and self.shards):
            raise JobError("give --plan and --shards, or --coordinator")
        if self.async_staleness < 0:
            raise JobError("--async-staleness: must be >= 0")


@dataclass
class JobResult:
    steps: int
    last_step: int
    loss: float
    samples_per_s: float


class TrainingJob:
    def __init__(self, settings: JobSettings) -> None:
        settings.check()
        self.s = settings
        self.model_cfg = ModelConfig.load(settings.config)
        self.follower = None
        if settings.coordinator:
            from trainer.coordination import PlanFollower

            self.follower = PlanFollower(settings.coordinator, settings.rank, tls_ca=settings.tls_ca,
                                         tls_cert=settings.tls_cert, tls_key=settings.tls_key).start()
            plan, shards = self.follower.current_plan()
        else:
            plan, shards = load_plan(settings.plan), list(settings.shards or [])
        collective = settings.transport == "collective"
        self.group = init_distributed(settings.rank, settings.world, plan.num_shards if collective else 0,
                                      settings.collective_timeout_s)
        self.trainer = ShardedTrainer(self.model_cfg, plan, shards, rank=settings.rank, world_size=settings.world,
                                      seed=settings.seed, wire_dtype=WIRE[settings.wire],
                                      transport=settings.transport, trainer_group=self.group,
                                      tls_ca=settings.tls_ca, token=settings.token, tls_cert=settings.tls_cert,
                                      tls_key=settings.tls_key,
                                      trainer_epoch=self.follower.agent.epoch if self.follower is not None else 0,
                                      member_check=self.follower.agent.check if self.follower is not None else None,
                                      rpc_timeout_s=settings.rpc_timeout_s)
        self.data = SyntheticData(self.model_cfg, seed=settings.seed)
        self.dense_publisher = None
        if settings.publish_dense and settings.rank == 0:
            from trainer.dense_publisher import DensePublisher

            self.dense_publisher = DensePublisher(settings.publish_dense, settings.dense_every)
        self.writer = None
        self._stop = False
        self._last_step: int | None = None  # the last step this trainer finished (for a readable failure)

    # ---------------------------------------------------------------------------------------- the loop

    def run(self) -> JobResult:
        try:
            return self._run()
        except RuntimeError as e:
            if not lost_peer(e):
                raise
            s = self.s
            after = f"after step {self._last_step}" if self._last_step is not None else "before its first step"
            resume = f" with --resume (newest checkpoint in {s.checkpoint_dir})" if s.checkpoint_dir else ""
            raise TrainerGroupError(
                f"trainer rank {s.rank} of {s.world}: the trainer group lost a peer {after}: {backend_reason(e)}. "
                f"Another trainer died or hung (its log says why); restart the job{resume}") from None

    def _run(self) -> JobResult:
        s, trainer = self.s, self.trainer
        first_step, position = self._resume()
        if s.logdir and s.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(s.logdir)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stop", True))
        remaining = s.steps - (first_step - s.first_step)
        bar = tqdm(total=remaining, desc=f"trainer {s.rank}", unit="step", disable=s.json or s.rank != 0)
        start = time.perf_counter()
        loss, done = float("nan"), 0
        sizes = [s.batch_size // s.world] * s.world
        local = (b.split(sizes)[s.rank] for b in self._batches(remaining, position))
        for res in trainer.train(local, first_step=first_step, pipelined=s.pipelined, staleness=s.async_staleness):
            loss, done = res.loss, done + 1
            self._last_step = res.step
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if s.json and s.rank == 0:
                print(json.dumps({"step": res.step, "loss": loss}), flush=True)
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss, res.step)
                self.writer.add_scalar("train/samples_per_s", done * s.batch_size / (time.perf_counter() - start),
                                       res.step)
            if s.eval_every and done % s.eval_every == 0:
                self._evaluate(res.step)
            if self.dense_publisher is not None:
                self.dense_publisher.maybe_publish(res.step, trainer.model)
            if self._between_steps(res.step, position + done):
                break
            bar.set_description(f"trainer {s.rank} plan v{trainer.router.plan.version}")
        trainer.wait_updates()
        bar.close()
        if s.eval_every and done % s.eval_every:
            self._evaluate(first_step + done - 1)
        elapsed = time.perf_counter() - start
        self._finish()
        return JobResult(done, first_step + done - 1, loss, round(done * s.batch_size / max(elapsed, 1e-9), 1))

    def _between_steps(self, step: int, data_position: int) -> bool:
        """Checkpoint cadence, SIGTERM and rollout fences, agreed by every trainer; True: stop here."""
        s, follower = self.s, self.follower
        if follower is not None:
            follower.step = step
            follower.agent.check()  # Fenced once a later incarnation of this rank registered: stop, write nothing
        halt, fence = self._agreed([self._stop, follower is not None and follower.fence_pending])
        periodic = s.checkpoint_every and (step + 1 - s.first_step) % s.checkpoint_every == 0
        if s.checkpoint_dir and (periodic or halt):
            self._checkpoint(step, data_position)
        if halt:
            log.info("SIGTERM: stopped after step %d", step)
            return True
        if fence:
            self.trainer.fence()
            resumed = follower.fence(step)
            if resumed.plan_version != self.trainer.router.plan.version:
                self.trainer.switch_plan(*follower.current_plan(resumed.plan_version))
                if s.checkpoint_dir:  # older checkpoints hold the old plan's slices: recovery needs a new one
                    self._checkpoint(step, data_position)
        return False

    # --------------------------------------------------------------------------------------- the parts

    def _resume(self) -> tuple[int, int]:
        """(first step, data position): from the newest checkpoint with --resume, else from the start."""
        s = self.s
        # LATEST is written last, so it names a complete checkpoint
        if not (s.resume or (s.resume_if_present and (Path(s.checkpoint_dir) / "LATEST").is_file())):
            return s.first_step, 0
        path = checkpoint.latest(s.checkpoint_dir)
        resumed: Any = None
        if s.rank == 0:
            resumed = checkpoint.restore(self.trainer, path)  # verifies, restores the shards and the dense state
        if s.world > 1:
            torch.distributed.barrier(group=self.group)
            if s.rank != 0:
                resumed = checkpoint.load_dense(self.trainer, path)
        log.info("resumed from %s at step %d (data position %d)", path, resumed.step + 1, resumed.data_position)
        return resumed.step + 1, resumed.data_position

    def _batches(self, count: int, position: int) -> Iterator[Batch]:
        s = self.s
        if s.data == "synthetic":
            return self.data.batches(s.batch_size, count, start=position)
        from trainer.criteo import CriteoReader

        reader = CriteoReader(s.data.removeprefix("criteo:").split(","), self.model_cfg, s.batch_size,
                              strict=s.strict, num_workers=s.data_workers, skip_batches=position)
        return (b for b in islice(reader, count) if b.batch_size == s.batch_size)  # whole batches only

    def _evaluate(self, step: int) -> None:
        s = self.s
        self.trainer.wait_updates()
        metrics = evaluate(self.trainer, self.data.batches(s.batch_size, s.eval_batches, stream=HELDOUT))
        if s.rank == 0:
            if self.writer is not None:
                for k, v in metrics.items():
                    self.writer.add_scalar(f"heldout/{k}", v, step)
            log.info("step %d held-out %s", step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if s.json:
                print(json.dumps({"step": step, "heldout": metrics}), flush=True)

    def _checkpoint(self, step: int, data_position: int) -> None:
        """A consistent cut at a step boundary: every trainer's update of `step` applied, then rank 0 saves."""
        s = self.s
        self.trainer.wait_updates()  # sync mode: every trainer's update of this step is applied
        if s.world > 1:
            torch.distributed.barrier(group=self.group)
        if s.rank == 0:
            saved = checkpoint.save(self.trainer, s.checkpoint_dir, step, data_position)
            log.info("checkpoint of step %d: %s", step, saved)
        if s.world > 1:
            torch.distributed.barrier(group=self.group)

    def _agreed(self, flags: list[bool]) -> list[bool]:
        """Each flag true on every rank once any rank saw it, so all stop at the same step boundary."""
        if self.s.world == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([int(f) for f in flags])
        torch.distributed.all_reduce(t, group=self.group)
        return [bool(x) for x in t.tolist()]

    def _finish(self) -> None:
        s, trainer = self.s, self.trainer
        if self.dense_publisher is not None:
            self.dense_publisher.close()
        if self.writer is not None:
            self.writer.close()
        if s.rank == 0 and s.out:
            out = Path(s.out)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(trainer.model.state_dict(), out / "dense.pt")
            if trainer.local is not None:
                torch.save(trainer.local.state_dict(), out / "local.pt")
        trainer.close()
        if self.follower is not None:
            self.follower.close()
        if torch.distributed.is_initialized():
            # an orderly teardown: a process group left to the interpreter's exit can abort in its destructor
            torch.distributed.barrier(group=self.group)
            torch.distributed.destroy_process_group()

