"""`trainer train` / `trainer evaluate` as a user runs them: progress, TensorBoard, held-out metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from embedding_service.process import launch
from protos.plan import dump_plan, load_plan
from protos.plan import shard_config as plan_shard_config
from tests.test_trainer_pipeline import PLAN, shard_config

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_plan_and_shard_config_commands(tmp_path):
    out = cli("plan", "--config", str(ROOT / "configs" / "tiny.yaml"), "--shards", "2", "--kind", "users=row_wise",
              "--kind", "items=column_wise")
    assert out.returncode == 0, out.stderr
    (tmp_path / "plan.json").write_text(out.stdout)
    assert load_plan(tmp_path / "plan.json") == PLAN
    sc = cli("shard-config", "--plan", str(tmp_path / "plan.json"), "--shard", "1", "--num-trainers", "2",
             "--collective")
    cfg = json.loads(sc.stdout)
    assert cfg == plan_shard_config(PLAN, 1, num_trainers=2, collective=True)
    assert (cfg["collective_rank"], cfg["collective_world_size"]) == (3, 4)
    bad = cli("plan", "--config", str(ROOT / "configs" / "tiny.yaml"), "--shards", "2", "--kind", "users=diagonal")
    assert bad.returncode != 0 and "users=diagonal" in bad.stderr


def test_train_logs_and_evaluate(tmp_path):
    (tmp_path / "plan.json").write_text(dump_plan(PLAN))
    shards = [launch(shard_config(s), workdir=tmp_path / f"s{s}") for s in range(2)]
    try:
        common = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--plan", str(tmp_path / "plan.json"),
                  "--shards", ",".join(s.address for s in shards), "--seed", "1"]
        out = cli("train", *common, "--steps", "60", "--batch-size", "128", "--logdir", str(tmp_path / "tb"),
                  "--eval-every", "30", "--out", str(tmp_path / "out"), "--json")
        assert out.returncode == 0, out.stderr[-3000:]
        lines = [json.loads(x) for x in out.stdout.splitlines()]
        assert [x["step"] for x in lines if "loss" in x and "event" not in x] == list(range(60))
        evals = [x for x in lines if "heldout" in x]
        assert [x["step"] for x in evals] == [29, 59] and 0.5 < evals[-1]["heldout"]["auc"] <= 1
        assert lines[-1]["event"] == "done" and lines[-1]["steps"] == 60
        acc = EventAccumulator(str(tmp_path / "tb"))
        acc.Reload()
        assert len(acc.Scalars("train/loss")) == 60 and len(acc.Scalars("heldout/auc")) == 2

        ev = cli("evaluate", *common, "--dense", str(tmp_path / "out" / "dense.pt"), "--batch-size", "128",
                 "--json")
        assert ev.returncode == 0, ev.stderr[-3000:]
        metrics = json.loads(ev.stdout)
        assert abs(metrics["auc"] - evals[-1]["heldout"]["auc"]) < 1e-9  # same shards, same dense state
        assert 0.5 < metrics["teacher_auc"] < 1 and metrics["ne"] > 0
        # the same job on Criteo TSV input (tiny config: its 5 features read C1..C5, 4 dense read I1..I4)
        tsv = tmp_path / "day.tsv"
        rows = ["\t".join([str(i % 2), *[str(i * j % 97) for j in range(13)],
                            *[f"{i * 7919 + j:x}" for j in range(26)]]) for i in range(300)]
        tsv.write_text("\n".join(rows) + "\n")
        crit = cli("train", *common, "--steps", "4", "--first-step", "1000", "--batch-size", "64",
                   "--data", f"criteo:{tsv}", "--json")
        assert crit.returncode == 0, crit.stderr[-3000:]
        assert json.loads(crit.stdout.splitlines()[-1])["steps"] == 4
    finally:
        for s in shards:
            s.kill()

    bad = cli("train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--plan", str(tmp_path / "plan.json"),
              "--shards", "127.0.0.1:1", "--steps", "1")
    assert bad.returncode != 0 and "has 2 shards, got 1" in bad.stderr


def test_sigterm_checkpoints_at_a_step_boundary_and_exits_zero(tmp_path):
    import signal

    (tmp_path / "plan.json").write_text(dump_plan(PLAN))
    shards = [launch(shard_config(s), workdir=tmp_path / f"s{s}") for s in range(2)]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
             "--plan", str(tmp_path / "plan.json"), "--shards", ",".join(s.address for s in shards),
             "--steps", "100000", "--batch-size", "64", "--checkpoint-dir", str(tmp_path / "ckpt"), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        first = json.loads(proc.stdout.readline())  # training is under way
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        done = json.loads(out.splitlines()[-1])
        assert done["event"] == "done" and first["step"] <= done["last_step"] < 100000
        manifest = json.loads((tmp_path / "ckpt" / f"step-{done['last_step']}" / "manifest.json").read_text())
        assert manifest["step"] == done["last_step"] and manifest["data_position"] == done["last_step"] + 1
    finally:
        for s in shards:
            s.kill()
