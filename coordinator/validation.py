"""Every reason a plan cannot be applied, each a sentence naming the table or shard.

`trainer.plan.validate_plan` stops at the first problem because a trainer only needs to refuse; an
operator reviewing a proposed or hand-edited plan wants the whole list at once, so this walks
everything and reports each violation separately.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from coordinator.cost import CostModel, format_bytes
from protos import common_pb2


def plan_violations(plan: common_pb2.ShardingPlan, *, model_tables: Sequence[common_pb2.TableConfig] | None = None,
                    alive_shards: Mapping[int, int] | None = None,
                    cost: CostModel | None = None) -> list[str]:
    """All violations of `plan`; [] when it is applicable.

    `model_tables`: the model's tables, which the plan must match exactly. `alive_shards`: registered,
    live shard id -> its capacity in bytes (0 when unknown); every owner must be among them and fit.
    """
    cost = cost or CostModel()
    out: list[str] = []
    if plan.version <= 0:
        out.append(f"plan version {plan.version}: must be positive")
    if plan.num_shards <= 0:
        out.append(f"num_shards {plan.num_shards}: must be positive")

    tables: dict[str, common_pb2.TableConfig] = {}
    for t in plan.tables:
        if t.name in tables:
            out.append(f"table {t.name!r}: listed twice in the plan's tables")
            continue
        tables[t.name] = t
        if t.num_rows <= 0 or t.dim <= 0:
            out.append(f"table {t.name!r}: {t.num_rows} rows x {t.dim} columns, both must be positive")
    if model_tables is not None:
        out += _model_mismatches(tables, model_tables)

    dp: set[str] = set()
    for name in plan.data_parallel:
        if name in dp:
            out.append(f"table {name!r}: listed twice in data_parallel")
        elif name not in tables:
            out.append(f"table {name!r}: data_parallel but not among the plan's tables")
        dp.add(name)

    by_table: dict[str, list[common_pb2.TableSlice]] = {}
    for i, ps in enumerate(plan.slices):
        s = ps.slice
        t = tables.get(s.table)
        if t is None:
            out.append(f"slice {i} on shard {ps.shard}: unknown table {s.table!r}")
            continue
        if not 0 <= ps.shard < plan.num_shards:
            out.append(f"slice {i} of table {s.table!r}: shard {ps.shard} outside [0, {plan.num_shards})")
        if s.num_rows <= 0 or s.num_cols <= 0:
            out.append(f"slice {i} of table {s.table!r}: empty ({s.num_rows} rows x {s.num_cols} columns)")
            continue
        if s.row_offset < 0 or s.row_offset + s.num_rows > t.num_rows or s.col_offset < 0 \
                or s.col_offset + s.num_cols > t.dim:
            out.append(f"slice {i} of table {s.table!r}: rows [{s.row_offset}, {s.row_offset + s.num_rows}) "
                       f"x columns [{s.col_offset}, {s.col_offset + s.num_cols}) outside the table's "
                       f"{t.num_rows} x {t.dim}")
            continue
        by_table.setdefault(s.table, []).append(s)

    for name, t in tables.items():
        slices = by_table.get(name, [])
        if name in dp:
            if slices:
                out.append(f"table {name!r}: data_parallel but also has {len(slices)} slices on the shards")
            continue
        if not slices:
            out.append(f"table {name!r}: no slices and not data_parallel")
            continue
        out += _tiling(t, slices)

    out += _shard_problems(plan, tables, alive_shards, cost)
    return out


def _model_mismatches(tables: Mapping[str, common_pb2.TableConfig],
                      model_tables: Sequence[common_pb2.TableConfig]) -> list[str]:
    out = []
    model = {t.name: t for t in model_tables}
    for name, m in model.items():
        p = tables.get(name)
        if p is None:
            out.append(f"table {name!r}: in the model but not in the plan")
        elif (p.num_rows, p.dim, list(p.features)) != (m.num_rows, m.dim, list(m.features)):
            out.append(f"table {name!r}: the plan has {p.num_rows} rows x {p.dim} for {list(p.features)}, "
                       f"the model {m.num_rows} x {m.dim} for {list(m.features)}")
    out += [f"table {name!r}: in the plan but not in the model" for name in tables if name not in model]
    return out


def _tiling(t: common_pb2.TableConfig, slices: list[common_pb2.TableSlice]) -> list[str]:
    """Column groups must tile [0, dim); within each, row ranges must tile [0, num_rows)."""
    out = []
    groups: dict[tuple[int, int], list[common_pb2.TableSlice]] = {}
    for s in slices:
        groups.setdefault((s.col_offset, s.num_cols), []).append(s)
    col = 0
    for c0, nc in sorted(groups):
        if c0 > col:
            out.append(f"table {t.name!r}: columns [{col}, {c0}) not covered (a gap)")
        elif c0 < col:
            out.append(f"table {t.name!r}: column slices overlap on columns [{c0}, {min(col, c0 + nc)})")
        col = max(col, c0 + nc)
        row = 0
        for s in sorted(groups[(c0, nc)], key=lambda s: (s.row_offset, s.num_rows)):
            end = s.row_offset + s.num_rows
            if s.row_offset > row:
                out.append(f"table {t.name!r}: rows [{row}, {s.row_offset}) not covered in columns "
                           f"[{c0}, {c0 + nc}) (a gap)")
            elif s.row_offset < row:
                out.append(f"table {t.name!r}: row slices overlap on rows [{s.row_offset}, {min(row, end)}) "
                           f"in columns [{c0}, {c0 + nc})")
            row = max(row, end)
        if row < t.num_rows:
            out.append(f"table {t.name!r}: rows [{row}, {t.num_rows}) not covered in columns [{c0}, {c0 + nc})")
    if col < t.dim:
        out.append(f"table {t.name!r}: columns [{col}, {t.dim}) not covered")
    return out


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
