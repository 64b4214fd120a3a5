"""Planner run time, balance and memory headroom from 26 to 2,000 tables over 4 to 256 shards.

One JSON line per (tables, shards) point. 26 tables are configs/criteo_kaggle.yaml; 200, 800 and 2,000
are synthetic (seeded): rows drawn log-uniformly from 10^2 to 10^7.3, dim 128, row-wise Adagrad, one
feature each at pooling 1. Capacities are `coordinator plan propose`'s default (twice an even share of
all the tables' bytes). Targets: at most 10 s a point, max/mean estimated cost at most 1.05 where the
capacities allow it, memory always respected. `headroom` is the smallest free fraction of any shard's
capacity. `--quick` runs a subset (seconds, not minutes).

    python -m benchmarks.planner_scale [--quick] [--tables 26 800] [--shards 16 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from coordinator.cost import CostModel, ShardCapacity
from coordinator.planner import plan_cost, propose
from coordinator.validation import plan_violations
from protos import common_pb2
from protos.model_config import ModelConfig
from protos.plan import row_bytes

TABLES = [26, 200, 800, 2000]
SHARDS = [4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 256]
QUICK_TABLES = [26, 800]
QUICK_SHARDS = [8, 56, 128]
CRITEO_CONFIG = "configs/criteo_kaggle.yaml"


def synthetic_tables(count: int, seed: int = 0, dim: int = 128, log10_rows: tuple[float, float] = (2.0, 7.3),
                     ) -> list[common_pb2.TableConfig]:
    """`count` tables of log-uniform rows (production models mix tiny and huge tables), one feature each."""
    rng = random.Random(seed)
    opt = common_pb2.OptimizerConfig(type=common_pb2.EXACT_ROWWISE_ADAGRAD, learning_rate=0.05)
    return [common_pb2.TableConfig(name=f"t{i}", num_rows=int(10 ** rng.uniform(*log10_rows)), dim=dim,
                                   features=[f"c{i}"], optimizer=opt)
            for i in range(count)]


def default_capacity(tables: list[common_pb2.TableConfig], shards: int) -> int:
    """What `coordinator plan propose` gives each shard without --capacity-mb: twice an even share."""
    return 2 * sum(t.num_rows * row_bytes(t, t.dim) for t in tables) // shards + 1


def run_point(tables: list[common_pb2.TableConfig], shards: int, label: str) -> dict:
    cost = CostModel()
    caps = [ShardCapacity(s, default_capacity(tables, shards)) for s in range(shards)]
    start = time.perf_counter()
    plan = propose(tables, caps, cost)
    seconds = time.perf_counter() - start
    violations = plan_violations(plan, model_tables=tables, alive_shards={c.shard: c.memory_bytes for c in caps},
                                 cost=cost)
    pc = plan_cost(plan, cost)
    free = [1 - b / c.memory_bytes for b, c in zip(pc.shard_bytes, caps, strict=True)]
    return {"benchmark": "planner_scale", "tables": len(tables), "model": label, "shards": shards,
            "propose_seconds": round(seconds, 3), "time_target_s": 10.0, "time_met": seconds <= 10.0,
            "balance_max_over_mean": round(pc.balance, 4), "balance_target": 1.05, "balance_met": pc.balance <= 1.05,
            "headroom_min_free_fraction": round(min(free), 4),
            "memory_respected": all(b <= c.memory_bytes for b, c in zip(pc.shard_bytes, caps, strict=True)),
            "capacity_bytes": caps[0].memory_bytes, "slices": len(plan.slices),
            "data_parallel_tables": len(plan.data_parallel),
            "split_tables": sum(1 for n in _slices_per_table(plan).values() if n > 1),
            "violations": violations}


def _slices_per_table(plan: common_pb2.ShardingPlan) -> dict[str, int]:
    out: dict[str, int] = {}
    for ps in plan.slices:
        out[ps.slice.table] = out.get(ps.slice.table, 0) + 1
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"tables {QUICK_TABLES} x shards {QUICK_SHARDS}")
    ap.add_argument("--tables", type=int, nargs="+", help=f"table counts (default {TABLES}; 26 is Criteo-Kaggle)")
    ap.add_argument("--shards", type=int, nargs="+", help=f"shard counts (default {SHARDS})")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    counts = args.tables or (QUICK_TABLES if args.quick else TABLES)
    shard_counts = args.shards or (QUICK_SHARDS if args.quick else SHARDS)
    for count in counts:
        if count == 26:
            tables, label = list(ModelConfig.load(CRITEO_CONFIG).tables), CRITEO_CONFIG
        else:
            tables, label = synthetic_tables(count, args.seed), f"synthetic(seed={args.seed})"
        for n in shard_counts:
            print(json.dumps(run_point(tables, n, label)), flush=True)


if __name__ == "__main__":
    main()
