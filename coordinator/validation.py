"""Every reason a plan cannot be applied now, each a sentence naming the table or shard.

The structural rules (tiling, bounds, the model's tables) are the plan's own (`protos.plan.violations`);
this adds what needs the live job: every owner registered and alive, and every shard's slices within
its capacity. An operator reviewing a proposed or hand-edited plan gets the whole list at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from coordinator.cost import CostModel, format_bytes
from protos import common_pb2
from protos.plan import violations


def plan_violations(plan: common_pb2.ShardingPlan, *, model_tables: Sequence[common_pb2.TableConfig] | None = None,
                    alive_shards: Mapping[int, int] | None = None,
                    cost: CostModel | None = None) -> list[str]:
    """All violations of `plan`; [] when it is applicable.

    `model_tables`: the model's tables, which the plan must match exactly. `alive_shards`: registered,
    live shard id -> its capacity in bytes (0 when unknown); every owner must be among them and fit.
    """
    tables = {t.name: t for t in plan.tables}
    return [str(v) for v in violations(plan, model_tables)] + _shard_problems(plan, tables, alive_shards,
                                                                                 cost or CostModel())


def _shard_problems(plan: common_pb2.ShardingPlan, tables: Mapping[str, common_pb2.TableConfig],
                    alive_shards: Mapping[int, int] | None, cost: CostModel) -> list[str]:
    """Owners must be registered and alive, and each shard's slices must fit its capacity."""
    owned: dict[int, list[str]] = {}
    need: dict[int, int] = {}
    for ps in plan.slices:
        t = tables.get(ps.slice.table)
        if t is None or not 0 <= ps.shard < plan.num_shards or ps.slice.num_rows <= 0 or ps.slice.num_cols <= 0:
            continue
        names = owned.setdefault(ps.shard, [])
        if t.name not in names:
            names.append(t.name)
        need[ps.shard] = need.get(ps.shard, 0) + cost.slice_cost(t, ps.slice).storage_bytes
    if alive_shards is None:
        return []
    out = []
    for shard in sorted(owned):
        if shard not in alive_shards:
            out.append(f"shard {shard}: owns slices of {owned[shard]} but is not registered or not alive")
            continue
        cap = alive_shards[shard]
        if cap > 0 and need[shard] > cap:
            needed, offered = format_bytes(need[shard]), format_bytes(cap)
            if needed == offered:
                needed, offered = f"{need[shard]} bytes", f"{cap} bytes"
            out.append(f"shard {shard}: needs {needed} for its slices, capacity {offered}")
    return out
