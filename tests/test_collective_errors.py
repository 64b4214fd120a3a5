"""The collective transport reports errors (issue 11, item 4): a shard-side failure reaches every trainer
as an error naming the shard and the step within a bounded time, and a killed shard makes the trainers
fail with a clear error instead of hanging. Real shard and trainer processes in one gloo group on loopback."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedding_service.process import launch
from protos.model_config import ModelConfig
from protos.plan import dump_plan, shard_config, simple_plan
from protos.process import free_port
from protos.shard_client import ShardClient
from trainer.job import lost_peer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny.yaml"
PLAN = simple_plan(ModelConfig.load(CONFIG), 2)  # every table whole: shard 1 holds items and hours
BOUND_S = 60.0  # every trainer must have failed by then (the group's timeout is 20 s)


def start_shards(tmp_path: Path, port: int, shrink_hours: bool = False) -> list:
    """Two collective shards; `shrink_hours`: shard 1 holds `hours` with 4 rows while the trainers' plan
    says 24, so ids the router passes on fail in the shard ("passes the router, fails in the shard")."""
    shards = []
    for s in range(2):
        cfg = shard_config(PLAN, s, num_trainers=2, seed=1, collective=True, collective_timeout_s=20)
        if shrink_hours and s == 1:
            cfg = copy.deepcopy(cfg)
            for entry in (*cfg["tables"], *cfg["slices"]):
                if entry.get("name", entry.get("table")) == "hours":
                    entry["num_rows"] = 4
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        shards.append(launch(cfg, workdir=tmp_path / f"shard{s}", env=env))
    return shards


def start_trainers(tmp_path: Path, shards: list, port: int, steps: int) -> list[subprocess.Popen]:
    (tmp_path / "plan.json").write_text(dump_plan(PLAN))
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "train", "--config", str(CONFIG), "--plan",
             str(tmp_path / "plan.json"), "--shards", ",".join(s.address for s in shards), "--transport",
             "collective", "--collective-timeout-s", "20", "--steps", str(steps), "--batch-size", "32",
             "--seed", "3", "--out", str(tmp_path / "out")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def error_line(err: str) -> str:
    """The trainer's error (its last words, after the progress bar's)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "collective transport:" in ln]
    assert lines, err[-3000:]
    return lines[-1][lines[-1].index("collective transport:"):]


def wait_failed(procs: list[subprocess.Popen], since: float) -> list[str]:
    """Every trainer's stderr once all have exited, asserting they did within BOUND_S and failed."""
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, since + BOUND_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a trainer still runs {BOUND_S:.0f} s after the shard failed: it hangs")
        assert p.returncode != 0, err[-2000:]
        errs.append(err)
    return errs


@pytest.mark.timeout(240)
def test_shard_side_failure_reaches_every_trainer(tmp_path):
    port = free_port()
    shards = start_shards(tmp_path, port, shrink_hours=True)
    try:
        start = time.monotonic()
        procs = start_trainers(tmp_path, shards, port, steps=20)
        errs = wait_failed(procs, start + 90)  # includes starting the trainers (imports, rendezvous)
        # every trainer fails; the ones that see the status round name the shard, the step and the cause
        # (a trainer whose peer trainer exited first may fail in DDP's own collective instead)
        named = [e for e in errs if "collective transport: shard 1 failed at step 0" in e]
        assert named, errs[0][-3000:]
        for err in named:
            last = error_line(err)
            assert last.startswith("collective transport: shard 1 failed at step 0: ids from trainer"), last
            assert "feature 'hour' (table 'hours'" in last and "out of range [0, 4)" in last, last
            assert "Traceback" not in err, "a clear error, not a traceback"
        for s in shards:  # the shards left the group but still serve gRPC
            assert s.proc.poll() is None
            with ShardClient(s.address, plan_version=PLAN.version) as c:
                assert c.info().shard_id in (0, 1)
        assert "collective: leaving the group: shard 1 failed at step" in shards[0].log_tail(20000)
    finally:
        for s in shards:
            s.kill()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_dead_or_frozen_shard_fails_trainers_instead_of_hanging(tmp_path, sig):
    """kill -9: the broken connections fail the exchange at once; SIGSTOP: the group's timeout (20 s) does."""
    port = free_port()
    shards = start_shards(tmp_path, port)
    procs: list[subprocess.Popen] = []
    try:
        procs = start_trainers(tmp_path, shards, port, steps=100000)
        with ShardClient(shards[1].address, plan_version=PLAN.version) as c:
            deadline = time.monotonic() + 120
            while c.info().applied_step < 3:  # training through the collective transport
                assert time.monotonic() < deadline, shards[1].log_tail()
                assert all(p.poll() is None for p in procs), "a trainer exited before the shard was killed"
                time.sleep(0.1)
        os.kill(shards[1].pid, sig)
        killed = time.monotonic()
        errs = wait_failed(procs, killed)
        took = time.monotonic() - killed
        # every trainer fails within the bound; the first to see the broken exchange names the shard (a
        # trainer whose peer trainer exited first may fail in DDP's own collective instead)
        named = [e for e in errs if f"shard 1 at {shards[1].address} does not answer" in e]
        assert named, errs[0][-3000:]
        for e in errs:  # and each says why in a line of its own (trainer.job.TrainerGroupError), no traceback
            assert "Traceback" not in e, e[-3000:]
        last = error_line(named[0])
        assert last.startswith("collective transport: the") and " of step " in last, last
        assert took < BOUND_S
        print(f"trainers failed {took:.1f} s after {sig.name}: {last}")
    finally:
        for p in procs:
            p.kill()
        for s in shards:
            s.kill()


LOSE_A_PEER = """
import json, os, signal, sys, torch, torch.distributed as dist
from trainer.job import backend_reason, lost_peer
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2)
t = torch.ones(1000)
for i in range(100000):
    if rank == 1 and i == 50:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        dist.all_reduce(t)
    except RuntimeError as e:
        print(json.dumps({"lost_peer": lost_peer(e), "reason": backend_reason(e), "raw": str(e)}), flush=True)
        os._exit(0)
"""


def test_a_killed_peer_in_a_real_gloo_group_reads_as_a_lost_peer():
    """What trainer.job turns into TrainerGroupError: gloo's error for a peer killed mid all-reduce, told
    from other RuntimeErrors, and its reason without gloo's source path or boilerplate."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", LOSE_A_PEER, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[1].returncode == -signal.SIGKILL
    seen = json.loads(out.strip().splitlines()[-1]) if out.strip() else pytest.fail(err[-3000:])
    assert "/gloo/" in seen["raw"]
    assert seen["lost_peer"] is True
    assert "/gloo/" not in seen["reason"] and "GLHF" not in seen["reason"], seen["reason"]
    assert any(w in seen["reason"] for w in ("Connection reset by peer", "Connection closed by peer",
                                             "Read error", "Timed out")), seen["reason"]
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # a bug stays a traceback
