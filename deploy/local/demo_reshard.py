"""The coordinator part of the demo: a training job re-sharded live, in the middle of training.

A coordinator (embedded Redis) holds plan v1 (2 shards); two trainers train the tiny DLRM through it.
Once they are a third of the way in, the planner proposes a balanced plan over 3 shards and the
coordinator rolls it out: the trainers pause at a step boundary, rows and optimizer state stream
shard-to-shard into the new layout, the plan flips, training goes on. Returns what it measured and the
job's last checkpoint (the serving part exports it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]


def run_reshard_demo(work: Path, *, steps: int = 600, batch_size: int = 256, quiet: bool = False) -> dict:
    from coordinator.cost import CostModel, ShardCapacity
    from coordinator.launcher import LocalShards, LocalTrainers
    from coordinator.planner import plan_cost, propose
    from coordinator.process import launch
    from protos import common_pb2, coordinator_pb2
    from protos.coordinator_client import CoordinatorClient
    from protos.model_config import ModelConfig
    from protos.plan import dump_plan, simple_plan
    from trainer.data import SyntheticData

    pb = coordinator_pb2
    config = ROOT / "configs" / "tiny.yaml"
    model = ModelConfig.load(config)
    v1 = simple_plan(model, 2, kinds={"users": common_pb2.ROW_WISE, "items": common_pb2.COLUMN_WISE})
    cost = CostModel(batch_size=batch_size)
    v2 = propose(model.tables, [ShardCapacity(i, 1 << 20) for i in range(3)], cost, data_parallel_max_bytes=0,
                 exact_rowwise_optimizers=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan-v1.json").write_text(dump_plan(v1))
    (work / "plan-v2.json").write_text(dump_plan(v2))
    coordinator = launch(["--initial-plan", str(work / "plan-v1.json")], workdir=work / "coordinator")
    client = CoordinatorClient(coordinator.address, token=coordinator.token)
    shards = LocalShards(coordinator.address, work, num_trainers=2, seed=1)
    trainers = None
    ckpt = work / "checkpoints"
    try:
        for i in range(2):
            shards.start(i, v1)
        shards.start(2, None)  # standby: the rollout gives it its slices
        trainers = LocalTrainers(coordinator.address, config, 2,
                                 ["--steps", str(steps), "--batch-size", str(batch_size), "--seed", "1",
                                  "--checkpoint-dir", str(ckpt), "--checkpoint-every", "100",
                                  "--eval-every", str(steps // 3), "--logdir", str(work / "tensorboard"), "--json"],
                                 work)
        trainers.start(resume=False)
        start = time.perf_counter()
        while True:
            running = [m.step for m in client.members() if m.kind == pb.TRAINER and m.state == pb.ALIVE]
            if len(running) == 2 and min(running) >= steps // 3:
                break
            if trainers.poll() is not None:
                raise RuntimeError(f"trainers exited early:\n{trainers.stderr_tail()}")
            time.sleep(0.05)
        last = None
        bar = tqdm(desc="live re-shard v1 -> v2 (2 -> 3 shards)", unit="B", unit_scale=True, disable=quiet)
        for p in client.apply(v2, base_version=1, author="demo", reason="scale out to 3 shards mid-training"):
            bar.total = max(p.bytes_total, 1)
            bar.update(p.bytes_done - bar.n)
            bar.set_postfix(phase=pb.RolloutPhase.Name(p.phase))
            last = p
        bar.close()
        if last is None or last.phase != pb.DONE:
            raise RuntimeError(f"rollout did not finish: {last}")
        while trainers.poll() is None:
            time.sleep(0.2)
        if trainers.poll() != 0:
            raise RuntimeError(f"trainers failed:\n{trainers.stderr_tail()}")
        elapsed = time.perf_counter() - start
        lines = [json.loads(line) for line in trainers.stdout(0).splitlines() if line.startswith("{")]
        heldout = [x["heldout"] for x in lines if "heldout" in x]
        done = next(x for x in lines if x.get("event") == "done")
        teacher = SyntheticData(model, seed=1).teacher_auc(8192)
        return {
            "reshard_plan": f"v1 ({v1.num_shards} shards) -> v{last.to_version} ({v2.num_shards} shards, balance "
                            f"{plan_cost(v2, cost).balance:.3f})",
            "reshard_fence_step": last.fence_step, "reshard_rows": last.rows_done,
            "reshard_bytes_between_shards": last.bytes_done, "reshard_pause_s": round(last.pause_s, 3),
            "job_steps": done["steps"], "job_samples_per_s": done["samples_per_s"], "job_wall_s": round(elapsed, 1),
            "job_heldout_auc": round(heldout[-1]["auc"], 4) if heldout else None,
            "teacher_heldout_auc": round(teacher, 4),
            "plan_history": [f"v{r.plan.version}: {r.reason}" for r in client.history().records],
            "checkpoint": str(ckpt / (ckpt / "LATEST").read_text().strip()), "config": str(config),
        }
    finally:
        if trainers is not None:
            trainers.stop()
        shards.stop_all()
        client.close()
        coordinator.kill()
