"""A randomized chaos soak: one coordinated sync job (a coordinator on a separate Redis, 2 shards, 2 trainers)
takes random faults at random times, recovers from each, and must end with the model of a fault-free run.

    python -m tests.chaos_soak [--faults 5] [--duration-s 600] [--seed 0] [--steps 600]

Faults (picked at random, one at a time, each after a random pause of --gap-s seconds of training):
  shard-kill9        kill -9 of a shard; the trainers fail (the shard is unreachable after their retries);
                     the shard is restarted and the job resumes from its last checkpoint (--resume)
  trainer-kill9      kill -9 of one trainer; the other fails; the job resumes from its last checkpoint
  coordinator-kill9  kill -9 of the coordinator; it is restarted on the same port (plan from Redis);
                     training goes on meanwhile
  redis-restart      kill -9 of Redis, restarted on the same port and append-only file after a random
                     0.5-3 s; the coordinator answers UNAVAILABLE meanwhile and reconnects; training goes on
  shard-stall        a partition (a TCP proxy in front of shard 1 stops forwarding) of a random 1 s up to
                     2.5 x the trainers' RPC deadline, then healed; a stall past the deadline fails the
                     trainers naming the shard, and the job resumes from its last checkpoint

Each fault prints one JSON line: {"fault", "t" (seconds since the soak started), "outcome",
"recover_s" (from the fault to training progressing again), ...}. The last line compares the finished
job with a fault-free reference (one process on the global batch; dense state, weights and optimizer
state within 1e-5): {"event": "result", "equals_reference": true|false, ...}; the exit status is 0 only
when it is equal. Faults stop at --faults or after --duration-s, whichever comes first (or when the job
finishes); the job then runs to its end. It reuses the test harness (tests/coordinated.py,
tests/redis_server.py, tests/tcp_proxy.py): run it from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc

from coordinator.process import launch as launch_coordinator
from protos import coordinator_pb2
from protos.coordinator_client import CoordinatorClient
from protos.process import free_port
from tests.coordinated import Job, assert_equals_reference
from tests.redis_server import RedisServer
from tests.tcp_proxy import StallingProxy

pb = coordinator_pb2
FAULTS = ("shard-kill9", "trainer-kill9", "coordinator-kill9", "redis-restart", "shard-stall")
RPC_TIMEOUT_S = 10.0


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


class Soak:
    def __init__(self, workdir: Path, steps: int, checkpoint_every: int, rng: random.Random) -> None:
        self.rng, self.steps, self.started = rng, steps, time.monotonic()
        self.redis = RedisServer(workdir / "redis", free_port()).start()
        self.coordinator_port, shard1_port = free_port(), free_port()
        self.proxy = StallingProxy(f"127.0.0.1:{shard1_port}")
        self.overrides = {1: {"server": {"port": shard1_port}, "advertise": self.proxy.address}}
        self.job = Job(workdir, "--redis", self.redis.url, "--port", str(self.coordinator_port), standby=0,
                       shard_overrides=self.overrides)
        self.ckpt = workdir / "ckpt"
        self.trainers = self.job.train(steps, "--checkpoint-dir", str(self.ckpt), "--checkpoint-every",
                                       str(checkpoint_every), "--rpc-timeout-s", str(RPC_TIMEOUT_S))
        self.resumes = 0

    # -- observation --------------------------------------------------------------------------
    def step(self) -> int | None:
        """The lowest step the trainers reported (None while the coordinator or Redis cannot say)."""
        try:
            steps = [m.step for m in self.job.client.members() if m.kind == pb.TRAINER and m.state == pb.ALIVE]
        except grpc.RpcError:
            return None
        return min(steps) if len(steps) == 2 else None

    def finished(self) -> bool:
        return self.trainers.poll() == 0

    def failed(self) -> bool:
        code = self.trainers.poll()
        return code is not None and code != 0

    def wait_progress(self, beyond: int, timeout_s: float = 180.0) -> bool:
        """True once training passed step `beyond` + 3 (or finished); False if the trainers failed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.finished():
                return True
            if self.failed():
                return False
            s = self.step()
            if s is not None and s >= beyond + 3:
                return True
            time.sleep(0.1)
        raise TimeoutError(f"no progress past step {beyond} within {timeout_s:.0f} s: {self.trainers.stderr_tail()}")

    def wait_exit(self, timeout_s: float = 120.0) -> str:
        """Waits for the trainers to stop; returns the first line of their error that names the cause."""
        deadline = time.monotonic() + timeout_s
        while self.trainers.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the trainers hang {timeout_s:.0f} s after the fault")
            time.sleep(0.1)
        lines = [ln for ln in self.trainers.stderr_tail(chars=20000).splitlines() if ln.strip()]
        named = [ln for ln in lines if "shard " in ln and (" at " in ln or "step" in ln)]
        return (named or lines or [""])[-1][:300]

    def resume(self) -> int:
        """Restarts the job from its last checkpoint; returns the step it resumed at."""
        self.resumes += 1
        self.trainers.start(resume=True)
        while True:
            out = self.trainers.stderr_tail(chars=1 << 20)
            if "resumed from" in out:
                return int(out.split("resumed from", 1)[1].split("at step", 1)[1].split()[0].rstrip(".,;)"))
            if self.failed():
                raise RuntimeError(f"the resumed job failed: {out[-2000:]}")
            time.sleep(0.1)

    # -- faults -------------------------------------------------------------------------------
    def inject(self, kind: str) -> dict:
        step = self.step()
        t0 = time.monotonic()
        rec: dict = {"fault": kind, "t": round(t0 - self.started, 2), "step": step}
        if kind == "shard-kill9":
            shard = self.rng.randrange(2)
            self.job.shards.procs[shard].proc.kill()
            rec["shard"] = shard
            rec["trainer_error"] = self.wait_exit()
            self.job.shards.start(shard, self.job_plan(), **self.overrides.get(shard, {}))
            self.job.client.wait_shards([shard], 60)
            rec["outcome"] = self._resume_and_progress(rec)
        elif kind == "trainer-kill9":
            rank = self.rng.randrange(2)
            os.killpg(self.trainers.procs[rank].pid, signal.SIGKILL)
            rec["rank"] = rank
            rec["survivor_error"] = self.wait_exit()
            rec["outcome"] = self._resume_and_progress(rec)
        elif kind == "coordinator-kill9":
            self.job.coordinator.proc.kill()
            self.job.coordinator.proc.wait(30)
            self.job.coordinator = launch_coordinator(
                ["--lease-s", "4", "--port", str(self.coordinator_port), "--redis", self.redis.url],
                workdir=self.job.tmp / "coordinator")
            self.job.client.close()
            self.job.client = CoordinatorClient(self.job.coordinator.address, token=self.job.coordinator.token)
            rec["outcome"] = self._progress(step, "training went on; restarted coordinator serves the plan")
        elif kind == "redis-restart":
            down = self.rng.uniform(0.5, 3.0)
            self.redis.kill9()
            time.sleep(down)
            self.redis.start()
            rec["down_s"] = round(down, 2)
            rec["outcome"] = self._progress(step, "training went on; the coordinator reconnected")
        elif kind == "shard-stall":
            stall = self.rng.uniform(1.0, 2.5 * RPC_TIMEOUT_S)
            self.proxy.stall()
            time.sleep(stall)
            self.proxy.heal()
            rec["stall_s"] = round(stall, 2)
            if self.trainers.poll() is None and stall < RPC_TIMEOUT_S:
                rec["outcome"] = self._progress(step, "healed: training went on")
            else:
                rec["trainer_error"] = self.wait_exit() if not self.finished() else ""
                rec["outcome"] = self._resume_and_progress(rec) if self.failed() else "finished"
        rec["recover_s"] = round(time.monotonic() - t0, 2)
        return rec

    def job_plan(self):
        record, _ = self.job.client.get_plan()
        return record.plan

    def _progress(self, step: int | None, ok: str) -> str:
        """Training goes on past the step it had reached when the fault ended (before it, if unknown yet)."""
        now = self.step()
        if self.wait_progress(max(now or 0, step or 0)):
            return ok
        error = self.wait_exit()
        self._resume_and_progress({})
        return f"trainers failed ({error}); resumed"

    def _resume_and_progress(self, rec: dict) -> str:
        at = self.resume()
        rec["resumed_at"] = at
        if not self.wait_progress(at):
            raise RuntimeError(f"the resumed job failed: {self.trainers.stderr_tail()}")
        return f"resumed from step {at}"

    def close(self) -> None:
        self.job.close()
        self.proxy.close()
        self.redis.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=5, help="inject at most this many faults (default 5)")
    p.add_argument("--duration-s", type=float, default=600.0,
                   help="inject no fault after this many seconds (default 600); the job then runs to its end")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of faults, victims and pauses")
    p.add_argument("--steps", type=int, default=600, help="training steps of the job (default 600)")
    p.add_argument("--checkpoint-every", type=int, default=20, help="the job's checkpoint interval in steps")
    p.add_argument("--gap-s", type=float, nargs=2, default=(2.0, 8.0), metavar=("MIN", "MAX"),
                   help="seconds of training before each fault, uniform in [MIN, MAX] (default 2 8)")
    p.add_argument("--kinds", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    p.add_argument("--workdir", help="keep logs, checkpoints and data here (default: a temporary directory)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(FAULTS))
    if unknown:
        p.error(f"--kinds: unknown {unknown}; choose from {','.join(FAULTS)}")
    rng = random.Random(args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(workdir, args.steps, args.checkpoint_every, rng)
    injected, result = 0, {"event": "result", "seed": args.seed, "steps": args.steps, "workdir": str(workdir)}
    try:
        deadline = soak.started + args.duration_s
        while not (soak.ckpt / "LATEST").exists():  # every fault has a checkpoint to resume from
            if soak.trainers.poll() is not None:
                raise RuntimeError(f"the job stopped before its first checkpoint: {soak.trainers.stderr_tail()}")
            time.sleep(0.1)
        while injected < args.faults and time.monotonic() < deadline:
            time.sleep(rng.uniform(*args.gap_s))
            if soak.trainers.poll() is not None:
                break
            emit(soak.inject(rng.choice(kinds)))
            injected += 1
        while soak.trainers.poll() is None:
            time.sleep(0.2)
        if soak.failed():  # a failure the fault handling did not see (reported, then resumed once)
            emit({"fault": "none", "outcome": f"trainers failed after the faults: {soak.wait_exit()}"})
            soak._resume_and_progress({})
            while soak.trainers.poll() is None:
                time.sleep(0.2)
        result.update(faults=injected, resumes=soak.resumes, seconds=round(time.monotonic() - soak.started, 1))
        try:
            assert_equals_reference(soak.job, args.steps)
            result["equals_reference"] = True
        except AssertionError as e:
            result.update(equals_reference=False, difference=str(e)[:500])
    except Exception as e:  # a hang or an unrecovered fault: reported, never hidden
        result.update(faults=injected, equals_reference=False, error=f"{type(e).__name__}: {e}"[:2000])
    finally:
        soak.close()
    emit(result)
    return 0 if result.get("equals_reference") else 1


if __name__ == "__main__":
    sys.exit(main())
