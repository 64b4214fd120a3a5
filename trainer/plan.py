"""Sharding plans: loading, validating against the model, per-shard assignments, simple plans.

The coordinator's planner (a later issue) produces plans with a cost model; `simple_plan` builds the
plain layouts (table-, row-, column- and table-row-wise) that tests, the demo and operators use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import json_format

from protos import common_pb2
from trainer.config import ModelConfig

ShardingType = common_pb2.ShardingType


class PlanError(ValueError):
    """A plan that cannot serve the model; the message names the table."""


def load_plan(path: str | Path) -> common_pb2.ShardingPlan:
    try:
        return json_format.Parse(Path(path).read_text(), common_pb2.ShardingPlan())
    except json_format.ParseError as e:
        raise PlanError(f"{path}: {e}") from None


def dump_plan(plan: common_pb2.ShardingPlan) -> str:
    return json.dumps(json_format.MessageToDict(plan, preserving_proto_field_name=True), indent=1)


def validate_plan(plan: common_pb2.ShardingPlan, model: ModelConfig) -> None:
    """Every table is data-parallel or tiled exactly once by its slices; tables match the model."""
    planned = {t.name: t for t in plan.tables}
    for t in model.tables:
        p = planned.get(t.name)
        if p is None:
            raise PlanError(f"table {t.name!r}: not in the plan")
        if (p.num_rows, p.dim, list(p.features)) != (t.num_rows, t.dim, list(t.features)):
            raise PlanError(f"table {t.name!r}: plan has {p.num_rows} rows x {p.dim} for {list(p.features)}, "
                            f"model has {t.num_rows} x {t.dim} for {list(t.features)}")
    extra = set(planned) - {t.name for t in model.tables}
    if extra:
        raise PlanError(f"tables {sorted(extra)}: in the plan but not in the model")
    if plan.num_shards <= 0:
        raise PlanError(f"num_shards: must be positive, got {plan.num_shards}")
    by_table: dict[str, list[common_pb2.TableSlice]] = {}
    for i, ps in enumerate(plan.slices):
        if not 0 <= ps.shard < plan.num_shards:
            raise PlanError(f"slice {i} of table {ps.slice.table!r}: shard {ps.shard} outside [0, {plan.num_shards})")
        if ps.slice.table not in planned:
            raise PlanError(f"slice {i}: unknown table {ps.slice.table!r}")
        by_table.setdefault(ps.slice.table, []).append(ps.slice)
    for t in model.tables:
        slices = by_table.get(t.name, [])
        if t.name in plan.data_parallel:
            if slices:
                raise PlanError(f"table {t.name!r}: data_parallel but also has {len(slices)} slices")
            continue
        if not slices:
            raise PlanError(f"table {t.name!r}: no slices (and not data_parallel)")
        _check_tiling(t, slices)


def _check_tiling(t: common_pb2.TableConfig, slices: list[common_pb2.TableSlice]) -> None:
    """Column groups partition [0, dim); within each, row ranges partition [0, num_rows)."""
    groups: dict[tuple[int, int], list[common_pb2.TableSlice]] = {}
    for s in slices:
        if s.num_rows <= 0 or s.num_cols <= 0:
            raise PlanError(f"table {t.name!r}: empty slice rows {s.row_offset}+{s.num_rows} "
                            f"cols {s.col_offset}+{s.num_cols}")
        groups.setdefault((s.col_offset, s.num_cols), []).append(s)
    col = 0
    for (c0, nc), members in sorted(groups.items()):
        if c0 != col:
            kind = "overlap" if c0 < col else "gap"
            raise PlanError(f"table {t.name!r}: columns {kind} at {min(c0, col)} "
                            f"(column slices must tile [0, {t.dim}))")
        col = c0 + nc
        row = 0
        for s in sorted(members, key=lambda s: s.row_offset):
            if s.row_offset != row:
                kind = "overlap" if s.row_offset < row else "gap"
                raise PlanError(f"table {t.name!r}: rows {kind} at {min(row, s.row_offset)} in columns "
                                f"[{c0}, {c0 + nc}) (row slices must tile [0, {t.num_rows}))")
            row = s.row_offset + s.num_rows
        if row != t.num_rows:
            raise PlanError(f"table {t.name!r}: rows [{row}, {t.num_rows}) not covered in columns [{c0}, {c0 + nc})")
    if col != t.dim:
        raise PlanError(f"table {t.name!r}: columns [{col}, {t.dim}) not covered")


def assignment(plan: common_pb2.ShardingPlan, shard: int) -> common_pb2.ShardAssignment:
    """What shard `shard` holds: its slices in plan order (a slice's index there is its position)."""
    a = common_pb2.ShardAssignment(plan_version=plan.version, shard_id=shard)
    names = []
    for ps in plan.slices:
        if ps.shard == shard:
            a.slices.add().CopyFrom(ps.slice)
            if ps.slice.table not in names:
                names.append(ps.slice.table)
    for t in plan.tables:
        if t.name in names:
            a.tables.add().CopyFrom(t)
    return a


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous (offset, size) ranges covering [0, total), sizes differing by at most one."""
    base, extra = divmod(total, parts)
    out, at = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((at, n))
        at += n
    return [r for r in out if r[1] > 0]


def simple_plan(model: ModelConfig, num_shards: int, version: int = 1,
                kinds: Mapping[str, int] | None = None, row_shards: int | None = None) -> common_pb2.ShardingPlan:
    """Table-wise round robin by default; `kinds[table]` picks ROW_WISE (rows split over all shards),
    COLUMN_WISE (columns split over all shards), TABLE_ROW_WISE (rows split over `row_shards` shards
    starting at the round-robin one) or DATA_PARALLEL."""
    kinds = kinds or {}
    plan = common_pb2.ShardingPlan(version=version, num_shards=num_shards)
    plan.tables.extend(model.tables)
    nxt = 0
    for t in model.tables:
        kind = kinds.get(t.name, common_pb2.TABLE_WISE)
        if kind == common_pb2.DATA_PARALLEL:
            plan.data_parallel.append(t.name)
            continue
        if kind == common_pb2.TABLE_WISE:
            cells = [(nxt % num_shards, 0, t.num_rows, 0, t.dim)]
            nxt += 1
        elif kind == common_pb2.ROW_WISE:
            cells = [(i, r0, nr, 0, t.dim) for i, (r0, nr) in enumerate(_split(t.num_rows, num_shards))]
        elif kind == common_pb2.COLUMN_WISE:
            cells = [(i, 0, t.num_rows, c0, nc) for i, (c0, nc) in enumerate(_split(t.dim, num_shards))]
        elif kind == common_pb2.TABLE_ROW_WISE:
            k = row_shards or 2
            cells = [((nxt + i) % num_shards, r0, nr, 0, t.dim) for i, (r0, nr) in enumerate(_split(t.num_rows, k))]
            nxt += 1
        else:
            raise PlanError(f"table {t.name!r}: unsupported sharding type {kind}")
        for shard, r0, nr, c0, nc in cells:
            plan.slices.add(shard=shard, slice=common_pb2.TableSlice(
                table=t.name, row_offset=r0, num_rows=nr, col_offset=c0, num_cols=nc, sharding_type=kind))
    return plan


def shard_config(plan: common_pb2.ShardingPlan, shard: int, *, num_trainers: int = 1, mode: str = "sync",
                 seed: int = 0, collective: bool = False, **extra) -> dict:
    """The `embedding-shard serve` config (JSON-ready) of one shard of a plan."""
    a = assignment(plan, shard)
    cfg = {"shard_id": shard, "plan_version": plan.version, "mode": mode, "num_trainers": num_trainers,
           "seed": seed,
           "tables": [json_format.MessageToDict(t, preserving_proto_field_name=True) for t in a.tables],
           "slices": [json_format.MessageToDict(s, preserving_proto_field_name=True,
                                                always_print_fields_with_no_presence=True) for s in a.slices]}
    if collective:
        cfg.update(collective_rank=num_trainers + shard, collective_world_size=num_trainers + plan.num_shards)
    cfg.update(extra)
    return cfg
