"""A live re-shard at dozens of real shards: rollout time, training pause and fence agreement vs shard count.

For each shard count N: a real coordinator, N shard processes (coordinator/launcher.py LocalShards) holding
2N small tables (`--rows` x `--dim`, table-wise round robin), 2 trainer processes (LocalTrainers) training
through them. Once both trainers are past step 10, a plan that moves every table to the next shard is
applied (every shard sends two tables and receives two), and the progress stream is
timed phase by phase:

- preparing: the new slices staged on every shard (trainers still train);
- fencing: FENCE published until both trainers stopped at one step boundary (the fence agreement time);
- migrating: rows pulled shard to shard, at most `pull_workers` pulls at once (RolloutSettings, default 4);
- committing: the new plan stored, every shard flipped, RESUME published.

`pause_s` is what the trainers waited (fencing + migrating + committing). One JSON line per N, with
`dominant_phase`. Each shard process takes ~300 MB: a count whose shards would not fit in the available
memory is skipped (a JSON line says so).

    python -m benchmarks.rollout_scale [--shards 4 8 16 32] [--rows 20000] [--dim 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import yaml
from tqdm import tqdm

from coordinator.launcher import LocalShards, LocalTrainers
from coordinator.process import launch
from coordinator.rollout import RolloutSettings
from protos import common_pb2, coordinator_pb2
from protos.coordinator_client import CoordinatorClient
from protos.model_config import ModelConfig
from protos.plan import dump_plan, simple_plan

pb = coordinator_pb2
SHARD_MB = 350  # resident size of one shard process with small tables, with margin
PHASES = ("VALIDATING", "PREPARING", "FENCING", "MIGRATING", "COMMITTING")


def model_yaml(tables: int, rows: int, dim: int) -> dict:
    opt = {"type": "exact_rowwise_adagrad", "learning_rate": 0.05}
    return {"dense": {"dense_features": 13, "bottom_mlp": [32, dim], "top_mlp": [32, 1], "dense_lr": 0.05},
            "tables": [{"name": f"t{i}", "num_rows": rows, "dim": dim, "features": [f"f{i}"], "optimizer": opt}
                       for i in range(tables)]}


def rotated(plan: common_pb2.ShardingPlan) -> common_pb2.ShardingPlan:
    """Every slice on the next shard: each shard sends and receives the same number of tables."""
    out = common_pb2.ShardingPlan()
    out.CopyFrom(plan)
    for s in out.slices:
        s.shard = (s.shard + 1) % plan.num_shards
    return out


def _wait(what: str, cond, timeout_s: float, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(poll_s)


def run_point(n: int, args: argparse.Namespace) -> dict:
    need_mb = (n + 3) * SHARD_MB  # the shards, two trainers and the coordinator
    avail_mb = psutil.virtual_memory().available / 2**20
    if avail_mb < need_mb:
        return {"benchmark": "rollout_scale", "shards": n, "skipped": f"needs ~{need_mb} MB, {avail_mb:.0f} available"}
    work = Path(tempfile.mkdtemp(prefix=f"rollout-scale-{n}-"))
    (work / "model.yaml").write_text(yaml.safe_dump(model_yaml(2 * n, args.rows, args.dim)))
    model = ModelConfig.load(work / "model.yaml")
    v1 = simple_plan(model, n)
    v2 = rotated(v1)
    (work / "v1.json").write_text(dump_plan(v1))
    coord = launch(["--initial-plan", str(work / "v1.json"), "--log-level", "WARNING", "--metrics-port", "-1"],
                   workdir=work / "coordinator")
    client = CoordinatorClient(coord.address, token=coord.token, timeout=60)
    shards = LocalShards(coord.address, work, num_trainers=2)
    trainers = None
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(tqdm(pool.map(lambda s: shards.start(s, v1), range(n)), total=n, desc=f"{n} shards up",
                      file=sys.stderr))
        _wait("shards registered", lambda: sum(1 for m in client.members()
                                               if m.kind == pb.SHARD and m.state == pb.ALIVE) >= n, 300)
        startup_s = time.monotonic() - t0
        trainers = LocalTrainers(coord.address, work / "model.yaml", 2,
                                 ["--steps", "1000000", "--batch-size", str(args.batch), "--json"], work)
        trainers.start(resume=False)

        def trainer_steps() -> list[int]:
            return [m.step for m in client.members() if m.kind == pb.TRAINER and m.state == pb.ALIVE]

        _wait("both trainers past step 10", lambda: len(s := trainer_steps()) == 2 and min(s) >= 10, 600)
        started = time.monotonic()
        entered: dict[str, float] = {}
        last = None
        for p in client.apply(v2, author="bench", reason=f"rotate {2 * n} tables over {n} shards"):
            name = pb.RolloutPhase.Name(p.phase)
            entered.setdefault(name, time.monotonic())
            last = p
        done = time.monotonic()
        assert last is not None and last.phase == pb.DONE, last.message if last else "no progress"
        fence_step = last.fence_step
        _wait("training resumed on the new plan", lambda: len(s := trainer_steps()) == 2
              and min(s) >= fence_step + 5, 300)
        order = [ph for ph in PHASES if ph in entered]
        bounds = [entered[ph] for ph in order] + [done]
        phases = {ph.lower() + "_s": round(bounds[i + 1] - bounds[i], 3) for i, ph in enumerate(order)}
        dominant = max(phases, key=phases.get)
        return {"benchmark": "rollout_scale", "shards": n, "tables": 2 * n, "trainers": 2, "rows_per_table": args.rows,
                "dim": args.dim, "mb_moved": round(last.bytes_done / 1e6, 2), "rows_moved": last.rows_done,
                "rollout_s": round(done - started, 3), "pause_s": round(last.pause_s, 3),
                "fence_agreement_s": phases.get("fencing_s"), **phases, "dominant_phase": dominant.removesuffix("_s"),
                "pull_workers": RolloutSettings().pull_workers, "shard_startup_s": round(startup_s, 1),
                "fence_step": fence_step, "host_load_1m": round(psutil.getloadavg()[0], 2)}
    finally:
        if trainers is not None:
            trainers.stop()
        shards.stop_all()
        client.close()
        coord.kill()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--rows", type=int, default=20000, help="rows of each table")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256, help="global batch size of the two trainers")
    args = ap.parse_args(argv)
    for n in args.shards:
        if n < 2:
            ap.error("--shards: each count must be >= 2 (a rotation needs two shards)")
        print(json.dumps(run_point(n, args)), flush=True)


if __name__ == "__main__":
    main()
