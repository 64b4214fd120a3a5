"""Planner balance and run time on the Criteo-Kaggle model over 4, 8 and 16 shards.

Prints one JSON line per case: the estimated max / mean shard cost (target <= 1.05), memory used per
shard against its capacity, the sharding types chosen, and how long `propose` took. Capacities are
equal: `roomy` gives each shard 1.5x its share of the total bytes, `tight` 1.05x (so the largest tables
must be split for memory). `hot` makes four tables hot (pooling 100 instead of 1). `exact` never cuts
the tables (row-wise Adagrad) into column slices, so training stays equal to one TBE (see `propose`).

    python -m benchmarks.planner_balance [--config configs/criteo_kaggle.yaml] [--shards 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from coordinator.cost import CostModel, ShardCapacity
from coordinator.planner import plan_cost, propose
from coordinator.validation import plan_violations
from protos.model_config import ModelConfig
from protos.plan import sharding_type_name, validate_plan

HOT = {"t2": 100.0, "t9": 100.0, "t14": 100.0, "t20": 100.0}
# case -> (capacity as a multiple of each shard's share of the bytes, pooling factors, exact_rowwise_optimizers)
CASES = {"roomy": (1.5, {}, False), "tight": (1.05, {}, False), "hot": (1.5, HOT, False), "exact": (1.5, {}, True)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/criteo_kaggle.yaml")
    ap.add_argument("--shards", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = ap.parse_args(argv)
    model = ModelConfig.load(args.config)
    for case in args.cases:
        headroom, pooling, exact = CASES[case]
        cost = CostModel(batch_size=args.batch_size, pooling_factors=pooling)
        dp_max = 64 * 1024
        total = sum(cost.table_bytes(t) for t in model.tables if cost.table_bytes(t) > dp_max)
        for n in args.shards:
            caps = [ShardCapacity(s, int(total * headroom / n)) for s in range(n)]
            start = time.perf_counter()
            plan = propose(model.tables, caps, cost, data_parallel_max_bytes=dp_max, exact_rowwise_optimizers=exact)
            seconds = time.perf_counter() - start
            validate_plan(plan, model)
            violations = plan_violations(plan, model_tables=model.tables,
                                         alive_shards={c.shard: c.memory_bytes for c in caps}, cost=cost)
            pc = plan_cost(plan, cost)
            kinds = Counter(sharding_type_name(ps.slice.sharding_type) for ps in plan.slices)
            print(json.dumps({
                "benchmark": "planner_balance", "config": args.config, "case": case, "shards": n,
                "capacity_bytes": caps[0].memory_bytes, "capacity_x_share": headroom, "exact_rowwise_optimizers": exact,
                "balance_max_over_mean": round(pc.balance, 4), "target": 1.05, "met": pc.balance <= 1.05,
                "max_cost_ms": round(pc.max_cost * 1e3, 4), "mean_cost_ms": round(pc.mean_cost * 1e3, 4),
                "memory_used": [round(b / c.memory_bytes, 3) for b, c in zip(pc.shard_bytes, caps, strict=True)],
                "memory_respected": all(b <= c.memory_bytes for b, c in zip(pc.shard_bytes, caps, strict=True)),
                "slices": len(plan.slices), "sharding_types": dict(sorted(kinds.items())),
                "data_parallel_tables": len(plan.data_parallel), "violations": violations,
                "propose_seconds": round(seconds, 4)}), flush=True)


if __name__ == "__main__":
    main()
