"""Local-process launchers for a job's shards and trainers (the embedded default; on Kubernetes the
StatefulSet and Job controllers play this part and the supervisor only decides what to restart)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from protos import common_pb2
from protos.plan import shard_config
from protos.process import ServerProcess, child_env, free_port, launch_with_config


class LocalShards:
    """`checkpoint_root`: where the shards may read and write checkpoints (default: `workdir`, the job's
    work area); it must contain the trainers' --checkpoint-dir."""

    def __init__(self, coordinator: str, workdir: Path, *, num_trainers: int, seed: int = 0,
                 checkpoint_root: str | Path | None = None, **extra) -> None:
        self.coordinator, self.workdir = coordinator, Path(workdir)
        self.checkpoint_root = str(Path(checkpoint_root or workdir).absolute())
        self.num_trainers, self.seed, self.extra = num_trainers, seed, extra
        self.procs: dict[int, ServerProcess] = {}
        self._starts = 0

    def start(self, shard: int, plan: common_pb2.ShardingPlan | None, **overrides) -> ServerProcess:
        """(Re)starts shard `shard` holding its slices of `plan` (seeded rows; a restore fills them), or on
        standby holding nothing when `plan` is None, registered with the coordinator. `overrides`: config
        keys for this shard only (e.g. `server` and `advertise`, to put a proxy in front of it)."""
        old = self.procs.pop(shard, None)
        if old is not None:
            old.kill()
        self._starts += 1
        cfg = shard_config(plan, shard, coordinator=self.coordinator, num_trainers=self.num_trainers, seed=self.seed,
                           checkpoint_root=self.checkpoint_root, **{**self.extra, **overrides})
        proc = launch_with_config("embedding_service.cli", cfg, what="shard",
                                  workdir=self.workdir / f"shard-{shard}-{self._starts}")
        self.procs[shard] = proc
        return proc

    def stop_all(self) -> None:
        for p in self.procs.values():
            p.kill()
        self.procs.clear()


class LocalTrainers:
    """`num_trainers` trainer processes with torchrun's environment contract (RANK, WORLD_SIZE, MASTER_*)."""

    def __init__(self, coordinator: str, config: str | Path, num_trainers: int, train_args: list[str],
                 workdir: Path) -> None:
        self.coordinator, self.config, self.num_trainers = coordinator, str(config), num_trainers
        self.train_args, self.workdir = list(train_args), Path(workdir)
        self.procs: list[subprocess.Popen] = []
        self._runs = 0

    def start(self, resume: bool) -> None:
        self.stop()
        self._runs += 1
        port = free_port()
        run_dir = self.workdir / f"trainers-{self._runs}"
        run_dir.mkdir(parents=True, exist_ok=True)
        for rank in range(self.num_trainers):
            env = child_env(dict(os.environ, RANK=str(rank), WORLD_SIZE=str(self.num_trainers), LOCAL_RANK=str(rank),
                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            cmd = [sys.executable, "-m", "trainer.cli", "train", "--config", self.config, "--coordinator",
                   self.coordinator, *self.train_args, *(["--resume"] if resume else [])]
            with open(run_dir / f"rank{rank}.out", "wb") as out, open(run_dir / f"rank{rank}.err", "wb") as err:
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True))

    def poll(self) -> int | None:
        """None while any trainer runs; then the worst exit code."""
        codes = [p.poll() for p in self.procs]
        if any(c is None for c in codes):
            return None
        return max((abs(c) for c in codes), default=0)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(30)
        self.procs = []

    def stderr_tail(self, chars: int = 3000) -> str:
        run_dir = self.workdir / f"trainers-{self._runs}"
        return "\n".join((run_dir / f"rank{r}.err").read_text()[-chars:] for r in range(self.num_trainers)
                         if (run_dir / f"rank{r}.err").exists())

    def stdout(self, rank: int = 0) -> str:
        path = self.workdir / f"trainers-{self._runs}" / f"rank{rank}.out"
        return path.read_text() if path.exists() else ""
