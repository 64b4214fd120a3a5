"""The sharding plan: the one concept every component shares, kept once below all of them.

As TorchRec keeps `ShardingType`, `ParameterSharding` and `ShardingPlan` in `distributed/types.py`
beneath its planner and sharders, the plan's rules live here beside the proto messages: loading and
dumping, the structural checks (every violation by name), a shard's assignment and its slices in
order, row bytes, contiguous splits, the plain layouts, and a shard's serve config. The coordinator's
planner and live checks (members, capacities), the trainer's router and the shard all build on it.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import json_format

from protos import common_pb2

ShardingType = common_pb2.ShardingType

# Optimizer state floats per row: a [rows] tensor (row-wise), a [rows, cols] one (per element), or none.
_ROWWISE_STATE = {common_pb2.EXACT_ROWWISE_ADAGRAD}
_ELEMENTWISE_STATE = {common_pb2.EXACT_ADAGRAD: 1, common_pb2.ADAM: 2, common_pb2.LAMB: 2,
                      common_pb2.PARTIAL_ROWWISE_ADAM: 1}


class HasTables(Protocol):
    """A model as the plan sees it: its tables (the trainer's ModelConfig is one)."""

    @property
    def tables(self) -> Sequence[common_pb2.TableConfig]: ...


def sharding_type_name(kind: int) -> str:
    """"table_wise", "row_wise", ... as plans and reports spell them (the proto enum name, lower case)."""
    if kind not in ShardingType.values():
        return "unspecified"
    return ShardingType.Name(kind).lower().removeprefix("sharding_type_")


# --------------------------------------------------------------------------------------------- violations


class ViolationKind(enum.Enum):
    """What is wrong, as a short stable name (the sentence says where and by how much)."""

    PLAN = "plan"
    TABLE = "table"
    MODEL = "model mismatch"
    DATA_PARALLEL = "data_parallel"
    SLICE = "slice"
    NO_SLICES = "no slices"
    COLUMNS_GAP = "columns gap"
    COLUMNS_OVERLAP = "columns overlap"
    ROWS_GAP = "rows gap"
    ROWS_OVERLAP = "rows overlap"


@dataclass(frozen=True)
class Violation:
    """One reason a plan cannot serve: `subject` names the table, slice or field."""

    subject: str
    kind: ViolationKind
    detail: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.detail}"

    def labelled(self) -> str:
        """The sentence with its kind, as a refusing component reports it ("table 'u': rows gap: ...")."""
        return f"{self.subject}: {self.kind.value}: {self.detail}"


class PlanError(ValueError):
    """A plan that cannot serve the model; the message names every violation's table or field."""

    def __init__(self, problem: str | Sequence[Violation]) -> None:
        self.violations = [] if isinstance(problem, str) else list(problem)
        super().__init__(problem if isinstance(problem, str) else "; ".join(v.labelled() for v in problem))


def violations(plan: common_pb2.ShardingPlan,
               model_tables: Sequence[common_pb2.TableConfig] | None = None) -> list[Violation]:
    """Every structural violation of `plan` ([] when it tiles its tables exactly): versions, tables,
    data-parallel names, slice bounds, tiling, and (given the model's tables) an exact match with them.
    What needs live members and capacities is the coordinator's (`coordinator.validation`)."""
    out: list[Violation] = []
    if plan.version <= 0:
        out.append(Violation(f"plan version {plan.version}", ViolationKind.PLAN, "must be positive"))
    if plan.num_shards <= 0:
        out.append(Violation(f"num_shards {plan.num_shards}", ViolationKind.PLAN, "must be positive"))

    tables: dict[str, common_pb2.TableConfig] = {}
    for t in plan.tables:
        if t.name in tables:
            out.append(Violation(f"table {t.name!r}", ViolationKind.TABLE, "listed twice in the plan's tables"))
            continue
        tables[t.name] = t
        if t.num_rows <= 0 or t.dim <= 0:
            out.append(Violation(f"table {t.name!r}", ViolationKind.TABLE,
                                 f"{t.num_rows} rows x {t.dim} columns, both must be positive"))
    if model_tables is not None:
        out += _model_mismatches(tables, model_tables)

    dp: set[str] = set()
    for name in plan.data_parallel:
        if name in dp:
            out.append(Violation(f"table {name!r}", ViolationKind.DATA_PARALLEL, "listed twice in data_parallel"))
        elif name not in tables:
            out.append(Violation(f"table {name!r}", ViolationKind.DATA_PARALLEL,
                                 "data_parallel but not among the plan's tables"))
        dp.add(name)

    by_table: dict[str, list[common_pb2.TableSlice]] = {}
    for i, ps in enumerate(plan.slices):
        s = ps.slice
        t = tables.get(s.table)
        if t is None:
            out.append(Violation(f"slice {i} on shard {ps.shard}", ViolationKind.SLICE, f"unknown table {s.table!r}"))
            continue
        where = f"slice {i} of table {s.table!r}"
        if not 0 <= ps.shard < plan.num_shards:
            out.append(Violation(where, ViolationKind.SLICE, f"shard {ps.shard} outside [0, {plan.num_shards})"))
        if s.num_rows <= 0 or s.num_cols <= 0:
            out.append(Violation(where, ViolationKind.SLICE, f"empty ({s.num_rows} rows x {s.num_cols} columns)"))
            continue
        if s.row_offset < 0 or s.col_offset < 0 or s.row_offset + s.num_rows > t.num_rows \
                or s.col_offset + s.num_cols > t.dim:
            out.append(Violation(where, ViolationKind.SLICE,
                                 f"rows [{s.row_offset}, {s.row_offset + s.num_rows}) x columns [{s.col_offset}, "
                                 f"{s.col_offset + s.num_cols}) outside the table's {t.num_rows} x {t.dim}"))
            if s.row_offset < 0 or s.col_offset < 0:
                continue  # a slice running past the end still covers what it covers
        by_table.setdefault(s.table, []).append(s)

    for name, t in tables.items():
        slices = by_table.get(name, [])
        if name in dp:
            if slices:
                out.append(Violation(f"table {name!r}", ViolationKind.DATA_PARALLEL,
                                     f"data_parallel but also has {len(slices)} slices on the shards"))
            continue
        if not slices:
            out.append(Violation(f"table {name!r}", ViolationKind.NO_SLICES, "no slices and not data_parallel"))
            continue
        out += _tiling(t, slices)
    return out


def validate_plan(plan: common_pb2.ShardingPlan, model: HasTables) -> None:
    """Refuses (PlanError naming every violation) a plan that does not tile exactly the model's tables."""
    found = violations(plan, list(model.tables))
    if found:
        raise PlanError(found)


def _model_mismatches(tables: Mapping[str, common_pb2.TableConfig],
                      model_tables: Sequence[common_pb2.TableConfig]) -> list[Violation]:
    out = []
    model = {t.name: t for t in model_tables}
    for name, m in model.items():
        p = tables.get(name)
        if p is None:
            out.append(Violation(f"table {name!r}", ViolationKind.MODEL, "in the model but not in the plan"))
        elif (p.num_rows, p.dim, list(p.features)) != (m.num_rows, m.dim, list(m.features)):
            out.append(Violation(f"table {name!r}", ViolationKind.MODEL,
                                 f"the plan has {p.num_rows} rows x {p.dim} for {list(p.features)}, "
                                 f"the model {m.num_rows} x {m.dim} for {list(m.features)}"))
    out += [Violation(f"table {name!r}", ViolationKind.MODEL, "in the plan but not in the model")
            for name in tables if name not in model]
    return out


def _tiling(t: common_pb2.TableConfig, slices: list[common_pb2.TableSlice]) -> list[Violation]:
    """Column groups must tile [0, dim); within each, row ranges must tile [0, num_rows)."""
    out = []
    subject = f"table {t.name!r}"
    groups: dict[tuple[int, int], list[common_pb2.TableSlice]] = {}
    for s in slices:
        groups.setdefault((s.col_offset, s.num_cols), []).append(s)
    col = 0
    for c0, nc in sorted(groups):
        if c0 > col:
            out.append(Violation(subject, ViolationKind.COLUMNS_GAP, f"columns [{col}, {c0}) not covered (a gap)"))
        elif c0 < col:
            out.append(Violation(subject, ViolationKind.COLUMNS_OVERLAP,
                                 f"column slices overlap on columns [{c0}, {min(col, c0 + nc)})"))
        col = max(col, c0 + nc)
        row = 0
        for s in sorted(groups[(c0, nc)], key=lambda s: (s.row_offset, s.num_rows)):
            end = s.row_offset + s.num_rows
            if s.row_offset > row:
                out.append(Violation(subject, ViolationKind.ROWS_GAP,
                                     f"rows [{row}, {s.row_offset}) not covered in columns [{c0}, {c0 + nc}) (a gap)"))
            elif s.row_offset < row:
                out.append(Violation(subject, ViolationKind.ROWS_OVERLAP,
                                     f"row slices overlap on rows [{s.row_offset}, {min(row, end)}) "
                                     f"in columns [{c0}, {c0 + nc})"))
            row = max(row, end)
        if row < t.num_rows:
            out.append(Violation(subject, ViolationKind.ROWS_GAP,
                                 f"rows [{row}, {t.num_rows}) not covered in columns [{c0}, {c0 + nc})"))
    if col < t.dim:
        out.append(Violation(subject, ViolationKind.COLUMNS_GAP, f"columns [{col}, {t.dim}) not covered"))
    return out


# ------------------------------------------------------------------------------------ files and placement


def load_plan(path: str | Path) -> common_pb2.ShardingPlan:
    """A plan JSON file (as `dump_plan` writes it); PlanError naming the file when unreadable."""
    try:
        return json_format.Parse(Path(path).read_text(), common_pb2.ShardingPlan())
    except (OSError, json_format.ParseError) as e:
        raise PlanError(f"{path}: not a readable plan: {e}") from None


def dump_plan(plan: common_pb2.ShardingPlan) -> str:
    return json.dumps(json_format.MessageToDict(plan, preserving_proto_field_name=True), indent=1)


@dataclass(frozen=True)
class Placement:
    """A plan slice where it lives: `index` is its position among its shard's slices in plan order,
    which is the slice index of that shard's assignment (and of every Lookup naming it)."""

    shard: int
    index: int
    slice: common_pb2.TableSlice


def placements(plan: common_pb2.ShardingPlan) -> list[Placement]:
    """Every slice of the plan, in plan order, with its index on its shard."""
    counters: dict[int, int] = {}
    out = []
    for ps in plan.slices:
        i = counters.get(ps.shard, 0)
        counters[ps.shard] = i + 1
        out.append(Placement(ps.shard, i, ps.slice))
    return out


def shard_slices(plan: common_pb2.ShardingPlan) -> dict[int, list[common_pb2.TableSlice]]:
    """Each shard's slices in assignment order (every shard of the plan present, possibly empty)."""
    out: dict[int, list[common_pb2.TableSlice]] = {s: [] for s in range(plan.num_shards)}
    for p in placements(plan):
        out.setdefault(p.shard, []).append(p.slice)
    return out


def assignment(plan: common_pb2.ShardingPlan, shard: int) -> common_pb2.ShardAssignment:
    """What shard `shard` holds: its slices in plan order, and the tables they cut."""
    a = common_pb2.ShardAssignment(plan_version=plan.version, shard_id=shard)
    names = []
    for s in shard_slices(plan).get(shard, []):
        a.slices.add().CopyFrom(s)
        if s.table not in names:
            names.append(s.table)
    for t in plan.tables:
        if t.name in names:
            a.tables.add().CopyFrom(t)
    return a


def row_bytes(table: common_pb2.TableConfig, num_cols: int) -> int:
    """Bytes of one row of a slice `num_cols` wide: float32 weights plus its optimizer state."""
    opt = table.optimizer.type or common_pb2.EXACT_SGD
    state = 4 if opt in _ROWWISE_STATE else 4 * num_cols * _ELEMENTWISE_STATE.get(opt, 0)
    if opt == common_pb2.PARTIAL_ROWWISE_ADAM:
        state += 4
    return 4 * num_cols + state


def split_range(total: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """`parts` contiguous (offset, size) ranges tiling [0, total); sizes are multiples of `align` where
    `total` is (TBE rows of 4-aligned widths stay vectorizable) and differ by at most one step. Sizes
    are 0 when there are more parts than units."""
    if align > 1 and (total % align or total // align < parts):
        align = 1
    base, extra = divmod(total // align, parts)
    out, at = [], 0
    for i in range(parts):
        n = (base + (1 if i < extra else 0)) * align
        out.append((at, n))
        at += n
    return out


# ------------------------------------------------------------------------------------------ plain layouts


def simple_plan(model: HasTables, num_shards: int, version: int = 1, kinds: Mapping[str, int] | None = None,
                row_shards: int | None = None) -> common_pb2.ShardingPlan:
    """Table-wise round robin by default; `kinds[table]` picks ROW_WISE (rows split over all shards),
    COLUMN_WISE (columns split over all shards), TABLE_ROW_WISE (rows split over `row_shards` shards
    starting at the round-robin one) or DATA_PARALLEL. Tests, the demo and operators use these; the
    coordinator's planner balances by cost instead."""
    kinds = kinds or {}
    plan = common_pb2.ShardingPlan(version=version, num_shards=num_shards)
    plan.tables.extend(model.tables)
    nxt = 0

    def split(total: int, parts: int) -> list[tuple[int, int]]:
        return [r for r in split_range(total, parts) if r[1] > 0]

    for t in model.tables:
        kind = kinds.get(t.name, common_pb2.TABLE_WISE)
        if kind == common_pb2.DATA_PARALLEL:
            plan.data_parallel.append(t.name)
            continue
        if kind == common_pb2.TABLE_WISE:
            cells = [(nxt % num_shards, 0, t.num_rows, 0, t.dim)]
            nxt += 1
        elif kind == common_pb2.ROW_WISE:
            cells = [(i, r0, nr, 0, t.dim) for i, (r0, nr) in enumerate(split(t.num_rows, num_shards))]
        elif kind == common_pb2.COLUMN_WISE:
            cells = [(i, 0, t.num_rows, c0, nc) for i, (c0, nc) in enumerate(split(t.dim, num_shards))]
        elif kind == common_pb2.TABLE_ROW_WISE:
            k = row_shards or 2
            cells = [((nxt + i) % num_shards, r0, nr, 0, t.dim) for i, (r0, nr) in enumerate(split(t.num_rows, k))]
            nxt += 1
        else:
            raise PlanError(f"table {t.name!r}: unsupported sharding type {kind}")
        for shard, r0, nr, c0, nc in cells:
            plan.slices.add(shard=shard, slice=common_pb2.TableSlice(
                table=t.name, row_offset=r0, num_rows=nr, col_offset=c0, num_cols=nc, sharding_type=kind))
    return plan


def shard_config(plan: common_pb2.ShardingPlan | None, shard: int, *, num_trainers: int = 1, mode: str = "sync",
                 seed: int = 0, collective: bool = False, **extra: Any) -> dict:
    """The `embedding-shard serve` config (JSON-ready) of one shard of a plan; `plan` None: a standby
    shard holding nothing until a rollout gives it slices."""
    cfg: dict[str, Any] = {"shard_id": shard, "plan_version": 0, "mode": mode, "num_trainers": num_trainers,
                           "seed": seed, "tables": [], "slices": []}
    if plan is not None:
        a = assignment(plan, shard)
        cfg.update(plan_version=plan.version,
                   tables=[json_format.MessageToDict(t, preserving_proto_field_name=True) for t in a.tables],
                   slices=[json_format.MessageToDict(s, preserving_proto_field_name=True,
                                                     always_print_fields_with_no_presence=True) for s in a.slices])
        if collective:
            cfg.update(collective_rank=num_trainers + shard, collective_world_size=num_trainers + plan.num_shards)
    cfg.update(extra)
    return cfg


# ----------------------------------------------------------------------------- tables and assignments


def _enum_value(enum_type: Any, value: Any, what: str) -> int:
    if isinstance(value, int):
        return value
    try:
        return enum_type.Value(str(value).upper())
    except ValueError:
        raise ValueError(f"{what}: unknown value {value!r}; expected one of {list(enum_type.keys())}") from None


def assignment_from_dict(raw: Mapping[str, Any]) -> common_pb2.ShardAssignment:
    """YAML-friendly form (model configs, shard configs): lower-case enum names; `slices` omitted means
    every table whole."""
    a = common_pb2.ShardAssignment(shard_id=int(raw.get("shard_id", 0)),
                                   plan_version=int(raw.get("plan_version", 0)))
    for t in raw.get("tables", []):
        t = dict(t)
        opt = dict(t.pop("optimizer", {}) or {})
        if "type" in opt:
            opt["type"] = _enum_value(common_pb2.OptimizerType, opt["type"], f"table {t.get('name')}.optimizer.type")
        if "pooling" in t:
            t["pooling"] = _enum_value(common_pb2.PoolingMode, t["pooling"], f"table {t.get('name')}.pooling")
        table = a.tables.add()
        json_format.ParseDict(t, table)
        json_format.ParseDict(opt, table.optimizer)
    slices = raw.get("slices")
    if slices is None:
        for t in a.tables:
            a.slices.add(table=t.name, row_offset=0, num_rows=t.num_rows, col_offset=0, num_cols=t.dim,
                         sharding_type=common_pb2.TABLE_WISE)
    else:
        for s in slices:
            s = dict(s)
            if "sharding_type" in s:
                s["sharding_type"] = _enum_value(common_pb2.ShardingType, s["sharding_type"], "slice.sharding_type")
            json_format.ParseDict(s, a.slices.add())
    return a


def validate_assignment(a: common_pb2.ShardAssignment) -> None:
    """Refuses (ValueError naming the table) tables without names, sizes or features, a feature mapped to
    two tables, and slices that do not fit their tables."""
    tables = {}
    features: dict[str, str] = {}
    for t in a.tables:
        if not t.name:
            raise ValueError("table without a name")
        if t.name in tables:
            raise ValueError(f"table {t.name!r} configured twice")
        if t.num_rows <= 0 or t.dim <= 0:
            raise ValueError(f"table {t.name!r}: num_rows and dim must be positive")
        if not t.features:
            raise ValueError(f"table {t.name!r}: no features look it up")
        for f in t.features:
            if f in features:
                raise ValueError(f"feature {f!r} maps to both {features[f]!r} and {t.name!r}")
            features[f] = t.name
        tables[t.name] = t
    for i, s in enumerate(a.slices):
        t = tables.get(s.table)
        if t is None:
            raise ValueError(f"slice {i}: unknown table {s.table!r}")
        if s.num_rows <= 0 or s.row_offset < 0 or s.row_offset + s.num_rows > t.num_rows:
            raise ValueError(
                f"slice {i} of table {s.table!r}: rows [{s.row_offset}, {s.row_offset + s.num_rows}) "
                f"outside [0, {t.num_rows})"
            )
        if s.num_cols <= 0 or s.col_offset < 0 or s.col_offset + s.num_cols > t.dim:
            raise ValueError(
                f"slice {i} of table {s.table!r}: columns [{s.col_offset}, {s.col_offset + s.num_cols}) "
                f"outside [0, {t.dim})"
            )
