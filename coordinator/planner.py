"""The sharding planner: table configs and shard capacities in, a ShardingPlan out.

Each table gets a layout, a grid of `col_parts` x `row_parts` slices on distinct shards:
  data_parallel   tables of at most `data_parallel_max_bytes` stay in the trainers (no shard work);
  table_wise      one slice;
  column_wise     wide tables (dim >= `column_wise_min_dim`) up front, and any table whose cost is mostly
                  its pooled output when the balance needs it split;
  row_wise        rows over every shard, table_row_wise rows over some of them: tables larger than a shard,
                  and hot tables (ids and lookup work dominate) when the balance needs them spread.
Placement is greedy (costliest slice first onto the least-loaded shard with room), then a local search
moves and swaps slices off the most loaded shard and splits its tables further until max/mean cost is
within `balance_target` or nothing improves. Memory is a hard constraint throughout; the result depends
only on the inputs (ties break by table order and shard id).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from coordinator.cost import CostModel, ShardCapacity, format_bytes
from protos import common_pb2
from protos.plan import row_bytes, split_range

_EPS = 1e-9
# Optimizers whose state or update couples a row's columns: a column slice of them is not the same math.
_ROWWISE_STATE = {common_pb2.EXACT_ROWWISE_ADAGRAD, common_pb2.PARTIAL_ROWWISE_ADAM, common_pb2.LAMB}


class PlanningError(ValueError):
    """A request no plan can satisfy; the message names the table or shard and the reason."""


@dataclass
class PlanCost:
    """Per-shard storage and estimated seconds per step of a plan, and its balance (max / mean cost)."""

    shard_bytes: list[int]
    shard_cost: list[float]

    @property
    def max_cost(self) -> float:
        return max(self.shard_cost, default=0.0)

    @property
    def mean_cost(self) -> float:
        return sum(self.shard_cost) / len(self.shard_cost) if self.shard_cost else 0.0

    @property
    def balance(self) -> float:
        return self.max_cost / self.mean_cost if self.mean_cost > 0 else 1.0


def plan_cost(plan: common_pb2.ShardingPlan, cost: CostModel) -> PlanCost:
    """Storage and cost each shard carries under `plan` (data-parallel tables cost the shards nothing)."""
    tables = {t.name: t for t in plan.tables}
    out = PlanCost(shard_bytes=[0] * plan.num_shards, shard_cost=[0.0] * plan.num_shards)
    for ps in plan.slices:
        t = tables.get(ps.slice.table)
        if t is None or not 0 <= ps.shard < plan.num_shards:
            continue  # plan_violations reports these
        c = cost.slice_cost(t, ps.slice)
        out.shard_bytes[ps.shard] += c.storage_bytes
        out.shard_cost[ps.shard] += c.cost
    return out


@dataclass
class _Cell:
    table: int
    row_offset: int
    num_rows: int
    col_offset: int
    num_cols: int
    cost: float
    bytes: int
    shard: int = -1


@dataclass
class _State:
    """A placement: which shard holds each cell, and what each shard carries."""

    capacity: list[int]
    load: list[float]
    used: list[int]
    holds: list[set[int]]  # table indices with a cell on each shard
    cells: dict[int, list[_Cell]] = field(default_factory=dict)  # table index -> its cells

    @classmethod
    def empty(cls, capacity: list[int]) -> _State:
        n = len(capacity)
        return cls(capacity=capacity, load=[0.0] * n, used=[0] * n, holds=[set() for _ in range(n)])

    def copy(self) -> _State:
        return _State(capacity=self.capacity, load=list(self.load), used=list(self.used),
                      holds=[set(h) for h in self.holds],
                      cells={t: [_Cell(**c.__dict__) for c in cs] for t, cs in self.cells.items()})

    def fits(self, cell: _Cell, shard: int) -> bool:
        return cell.table not in self.holds[shard] and self.used[shard] + cell.bytes <= self.capacity[shard]

    def put(self, cell: _Cell, shard: int) -> None:
        cell.shard = shard
        self.load[shard] += cell.cost
        self.used[shard] += cell.bytes
        self.holds[shard].add(cell.table)

    def take(self, cell: _Cell) -> None:
        s = cell.shard
        self.load[s] -= cell.cost
        self.used[s] -= cell.bytes
        self.holds[s].discard(cell.table)
        cell.shard = -1

    def place_least_loaded(self, cell: _Cell) -> bool:
        options = [s for s in range(len(self.load)) if self.fits(cell, s)]
        if not options:
            return False
        self.put(cell, min(options, key=lambda s: (self.load[s], self.used[s] - self.capacity[s], s)))
        return True

    def place_most_free(self, cell: _Cell) -> bool:
        options = [s for s in range(len(self.load)) if self.fits(cell, s)]
        if not options:
            return False
        self.put(cell, min(options, key=lambda s: (self.used[s] - self.capacity[s], self.load[s], s)))
        return True

    def place_making_room(self, cell: _Cell, limit: float) -> bool:
        """Onto the least-loaded shard that stays under `limit`, first moving one of its cells to another
        shard under `limit` if that is what makes room (the light shards are often full of cold tables)."""
        n = len(self.load)
        for d in sorted(range(n), key=lambda s: (self.load[s], s)):
            if self.load[d] + cell.cost >= limit * (1 - _EPS):
                break
            if cell.table in self.holds[d]:
                continue
            if self.fits(cell, d):
                self.put(cell, d)
                return True
            mine = sorted((x for xs in self.cells.values() for x in xs if x.shard == d and x is not cell),
                          key=lambda x: (x.cost, -x.bytes, x.table, x.col_offset, x.row_offset))
            for x in mine:
                if self.used[d] - x.bytes + cell.bytes > self.capacity[d] or x.table == cell.table:
                    continue
                for e in sorted(range(n), key=lambda s: (self.load[s], s)):
                    if e != d and self.fits(x, e) and self.load[e] + x.cost < limit * (1 - _EPS):
                        self.take(x)
                        self.put(x, e)
                        self.put(cell, d)
                        return True
        return self.place_least_loaded(cell)

    def key(self) -> list[float]:
        return sorted(self.load, reverse=True)

    def balance(self) -> float:
        mean = sum(self.load) / len(self.load)
        return max(self.load) / mean if mean > 0 else 1.0


def _leximax_better(a: list[float], b: list[float]) -> bool:
    """Leximax: a lower most-loaded shard, or the same and a lower second, and so on. Unlike the max
    alone, this accepts a split that unloads one of several equally loaded shards, a step towards
    unloading them all; unlike a sum of squares, it does not count the split's extra wire bytes against it."""
    for x, y in zip(a, b, strict=True):
        if x < y * (1 - _EPS):
            return True
        if x > y * (1 + _EPS):
            return False
    return False


def _squares_better(a: list[float], b: list[float]) -> bool:
    """A lower most-loaded shard, or the same and a lower sum of squares: prefers splits that spread
    evenly without adding wire bytes."""
    if a[0] < b[0] * (1 - _EPS):
        return True
    return a[0] <= b[0] * (1 + _EPS) and sum(x * x for x in a) < sum(y * y for y in b) * (1 - _EPS)


def propose(tables: Sequence[common_pb2.TableConfig], capacities: Sequence[ShardCapacity], cost: CostModel, *,
            version: int = 1, data_parallel_max_bytes: int = 64 * 1024, column_wise_min_dim: int = 256,
            balance_target: float = 1.05, max_splits: int = 64,
            data_parallel: Collection[str] | None = None,
            exact_rowwise_optimizers: bool = False) -> common_pb2.ShardingPlan:
    """A plan for `tables` over the shards of `capacities` (ids 0..N-1); PlanningError says why none exists.

    `data_parallel` names the tables kept in the trainers instead of those of at most
    `data_parallel_max_bytes` (a re-plan passes the current plan's list: a live rollout cannot move a
    table between the trainers and the shards).

    `max_splits` bounds the local search's extra splits: each one adds wire bytes, so the search only
    splits while that lowers the most loaded shard.

    A column slice of a table whose optimizer keeps per-row state (row-wise Adagrad, partial row-wise
    Adam, LAMB's per-row trust ratio) keeps that state over its own columns only, so training no longer
    equals one TBE to float tolerance. TorchRec's column-wise sharding accepts that difference and so does
    the default here; `exact_rowwise_optimizers=True` never cuts such tables into columns (they are then
    balanced by moves and row splits only, which on the pooling-1 Criteo tables cannot reach 1.05).
    """
    caps = _check_capacities(capacities)
    n = len(caps)
    _check_tables(tables)
    if data_parallel is None:
        dp = [i for i, t in enumerate(tables) if cost.table_bytes(t) <= data_parallel_max_bytes]
    else:
        unknown = sorted(set(data_parallel) - {t.name for t in tables})
        if unknown:
            raise PlanningError(f"data_parallel: unknown tables {unknown}")
        dp = [i for i, t in enumerate(tables) if t.name in set(data_parallel)]
    sharded = [i for i in range(len(tables)) if i not in set(dp)]
    _check_storage(tables, sharded, caps, cost)

    max_cols = {i: 1 if tables[i].optimizer.type in _ROWWISE_STATE and exact_rowwise_optimizers
                else _max_col_parts(tables[i]) for i in sharded}
    layouts: dict[int, tuple[int, int]] = {}
    for i in sharded:
        t = tables[i]
        cols = min(n, max_cols[i], math.ceil(t.dim / max(1, column_wise_min_dim // 2))) \
            if t.dim >= column_wise_min_dim else 1
        widest = split_range(t.dim, cols, 4)[0][1]
        rows = min(t.num_rows, n // cols, max(1, math.ceil(t.num_rows * row_bytes(t, widest) / max(caps))))
        layouts[i] = (cols, rows)

    start = _greedy(tables, layouts, caps, cost)
    _improve(start)
    # Searches that judge a split differently and that do or do not re-place every table after one; the
    # lowest most-loaded shard wins, then the least total cost. Each is milliseconds on hundreds of slices.
    results = [_search(tables, layouts, max_cols, start, cost, balance_target, max_splits, better, replace_all)
               for better in (_leximax_better, _squares_better) for replace_all in (False, True)]
    layouts, state = min(results, key=lambda r: _worth(r[1]))
    return _to_plan(tables, dp, layouts, state, n, version)


def _search(tables: Sequence[common_pb2.TableConfig], layouts: dict[int, tuple[int, int]], max_cols: dict[int, int],
            state: _State,
            cost: CostModel, balance_target: float, max_splits: int,
            better: Callable[[list[float], list[float]], bool],
            replace_all: bool) -> tuple[dict[int, tuple[int, int]], _State]:
    """Split while the balance misses the target and a split helps by `better`; return the best placement
    seen by `_worth`, so stepping-stone splits that never lowered the most loaded shard are undone."""
    best = (layouts, state)
    for _ in range(max_splits):
        if state.balance() <= balance_target:
            break
        found = _split_once(tables, layouts, max_cols, state, cost, better, replace_all)
        if found is None:
            break
        layouts, state = found
        if _worth(state) < _worth(best[1]):
            best = (layouts, state)
    return best


def _worth(state: _State) -> tuple[float, float]:
    """The most loaded shard (rounded to a part in 1e9 so float noise ties), then the total cost: of two
    plans with the same bottleneck the one doing less work is better, whatever its max / mean says."""
    return round(max(state.load) * 1e9) / 1e9, sum(state.load)


def _check_capacities(capacities: Sequence[ShardCapacity]) -> list[int]:
    if not capacities:
        raise PlanningError("no shards: the planner needs at least one shard capacity")
    ids = sorted(c.shard for c in capacities)
    if ids != list(range(len(capacities))):
        raise PlanningError(f"capacities: shard ids must be 0..{len(capacities) - 1} once each, got {ids}")
    caps = [0] * len(capacities)
    for c in capacities:
        caps[c.shard] = c.memory_bytes
    return caps


def _check_tables(tables: Sequence[common_pb2.TableConfig]) -> None:
    seen: set[str] = set()
    for t in tables:
        if t.name in seen:
            raise PlanningError(f"table {t.name!r}: listed twice")
        seen.add(t.name)
        if t.num_rows <= 0 or t.dim <= 0:
            raise PlanningError(f"table {t.name!r}: num_rows and dim must be positive, got {t.num_rows} x {t.dim}")


def _check_storage(tables: Sequence[common_pb2.TableConfig], sharded: list[int], caps: list[int],
                   cost: CostModel) -> None:
    """Refuse what no split can fit: a shard too small for any slice, a table or all tables over the total."""
    if not sharded:
        return
    smallest = min(sharded, key=lambda i: (row_bytes(tables[i], tables[i].dim), i))
    one_row = row_bytes(tables[smallest], tables[smallest].dim)
    for s, cap in enumerate(caps):
        if cap < one_row:
            raise PlanningError(f"shard {s}: capacity {format_bytes(cap)} is too small for any slice (the "
                                f"smallest, one row of table {tables[smallest].name!r}, needs {format_bytes(one_row)})")
    total = sum(caps)
    for i in sharded:
        need = cost.table_bytes(tables[i])
        if need > total:
            raise PlanningError(f"table {tables[i].name!r} needs {format_bytes(need)} but the {len(caps)} shards "
                                f"offer {format_bytes(total)} in total")
    need = sum(cost.table_bytes(tables[i]) for i in sharded)
    if need > total:
        raise PlanningError(f"the {len(sharded)} sharded tables need {format_bytes(need)} but the {len(caps)} "
                            f"shards offer {format_bytes(total)} in total")


def _max_col_parts(t: common_pb2.TableConfig) -> int:
    return t.dim // 4 if t.dim % 4 == 0 and t.dim >= 4 else t.dim


def _cells(tables: Sequence[common_pb2.TableConfig], i: int, layout: tuple[int, int], cost: CostModel) -> list[_Cell]:
    t = tables[i]
    cols, rows = layout
    out = []
    for c0, nc in split_range(t.dim, cols, 4):
        for r0, nr in split_range(t.num_rows, rows):
            sc = cost.cell_cost(t, nr, nc)
            out.append(_Cell(i, r0, nr, c0, nc, sc.cost, sc.storage_bytes))
    return out


def _place_all(tables: Sequence[common_pb2.TableConfig], layouts: dict[int, tuple[int, int]], caps: list[int],
               cost: CostModel) -> tuple[_State | None, _Cell | None]:
    """Costliest cells first onto the least-loaded shard with room; when memory is too tight for that, largest
    cells first onto the shard with the most room (first fit decreasing). Returns the placement, or None
    and a cell that fitted nowhere."""
    stuck = None
    for memory_first in (False, True):
        state = _State.empty(caps)
        for i in sorted(layouts):
            state.cells[i] = _cells(tables, i, layouts[i], cost)
        cells = [c for i in sorted(layouts) for c in state.cells[i]]
        if memory_first:
            cells.sort(key=lambda c: (-c.bytes, -c.cost, c.table, c.col_offset, c.row_offset))
            stuck = next((c for c in cells if not state.place_most_free(c)), None)
        else:
            cells.sort(key=lambda c: (-c.cost, -c.bytes, c.table, c.col_offset, c.row_offset))
            stuck = next((c for c in cells if not state.place_least_loaded(c)), None)
        if stuck is None:
            return state, None
    return None, stuck


def _greedy(tables: Sequence[common_pb2.TableConfig], layouts: dict[int, tuple[int, int]], caps: list[int],
            cost: CostModel) -> _State:
    """`_place_all`; when a cell fits nowhere its table gets one more row split (or, when it is split over as
    many shards as it can be, the table with the largest slices does) and placement starts again."""
    n = len(caps)

    def can_grow(i: int) -> bool:
        cols, rows = layouts[i]
        return cols * (rows + 1) <= n and rows + 1 <= tables[i].num_rows

    while True:
        state, stuck = _place_all(tables, layouts, caps, cost)
        if state is not None:
            return state
        assert stuck is not None
        if can_grow(stuck.table):
            grow = stuck.table
        else:
            sizes = {i: max(c.bytes for c in _cells(tables, i, layouts[i], cost)) for i in layouts if can_grow(i)}
            if not sizes:
                t = tables[stuck.table]
                cols, rows = layouts[stuck.table]
                raise PlanningError(
                    f"table {t.name!r} ({format_bytes(cost.table_bytes(t))}) does not fit: split into {cols * rows} "
                    f"slices on distinct shards, a slice of {format_bytes(stuck.bytes)} finds no shard with room "
                    "after placing the larger slices")
            grow = min(sizes, key=lambda i: (-sizes[i], i))
        cols, rows = layouts[grow]
        layouts[grow] = (cols, rows + 1)


def _improve(state: _State, max_rounds: int = 10_000) -> None:
    """Move or swap cells off the most loaded shard while that lowers it below where it was."""
    n = len(state.load)
    for _ in range(max_rounds):
        src = max(range(n), key=lambda s: (state.load[s], -s))
        top = state.load[src]
        mine = sorted((c for cs in state.cells.values() for c in cs if c.shard == src),
                      key=lambda c: (-c.cost, c.table, c.col_offset, c.row_offset))
        if not _move(state, src, top, mine) and not _swap(state, src, top, mine):
            return


def _move(state: _State, src: int, top: float, mine: list[_Cell]) -> bool:
    for dst in sorted(range(len(state.load)), key=lambda s: (state.load[s], s)):
        if dst == src:
            continue
        for c in mine:
            if state.load[dst] + c.cost < top * (1 - _EPS) and state.fits(c, dst):
                state.take(c)
                state.put(c, dst)
                return True
    return False


def _swap(state: _State, src: int, top: float, mine: list[_Cell]) -> bool:
    others = sorted((c for cs in state.cells.values() for c in cs if c.shard != src),
                    key=lambda c: (state.load[c.shard], c.shard, c.cost, c.table, c.col_offset, c.row_offset))
    for a in mine:
        for b in others:
            d = a.cost - b.cost
            dst = b.shard
            if d <= 0 or a.table == b.table or state.load[dst] + d >= top * (1 - _EPS):
                continue
            if a.table in state.holds[dst] or b.table in state.holds[src]:
                continue
            if (state.used[src] - a.bytes + b.bytes > state.capacity[src]
                    or state.used[dst] - b.bytes + a.bytes > state.capacity[dst]):
                continue
            state.take(a)
            state.take(b)
            state.put(a, dst)
            state.put(b, src)
            return True
    return False


def _split_once(tables: Sequence[common_pb2.TableConfig], layouts: dict[int, tuple[int, int]],
                max_cols: dict[int, int], state: _State,
                cost: CostModel, better: Callable[[list[float], list[float]], bool], replace_all: bool,
                ) -> tuple[dict[int, tuple[int, int]], _State] | None:
    """Try more row or column parts for each table on the most loaded shards; keep the best result (after
    moves and swaps) if it beats the current placement."""
    n = len(state.load)
    top = max(state.load)
    tops = {s for s in range(n) if state.load[s] >= top * (1 - _EPS)}  # all of them, as ties are common
    candidates = sorted({c.table for cs in state.cells.values() for c in cs if c.shard in tops},
                        key=lambda i: (-max(c.cost for c in state.cells[i] if c.shard in tops), i))
    best: tuple[dict[int, tuple[int, int]], _State] | None = None
    for i in candidates:
        cols, rows = layouts[i]
        more_rows = [(cols, r) for r in range(rows + 1, min(n // cols, tables[i].num_rows) + 1)]
        more_cols = [(c, rows) for c in range(cols + 1, min(n // rows, max_cols[i]) + 1)]
        for layout in more_rows + more_cols:
            new_layouts = {**layouts, i: layout}
            trials = [_replace_table(tables, i, layout, state, cost)]
            if replace_all:
                trials.append(_place_all(tables, new_layouts, state.capacity, cost)[0])
            for trial in trials:
                if trial is None:
                    continue
                _improve(trial)
                if better(trial.key(), (best[1] if best else state).key()):
                    best = (new_layouts, trial)
    return best


def _replace_table(tables: Sequence[common_pb2.TableConfig], i: int, layout: tuple[int, int], state: _State,
                   cost: CostModel) -> _State | None:
    """`state` with table i's cells replaced by those of `layout`, placed onto the least-loaded shards (making
    room there if needed); None when one finds no room (a fresh placement of every table may still find some)."""
    trial = state.copy()
    limit = max(state.load)
    for c in trial.cells[i]:
        trial.take(c)
    trial.cells[i] = _cells(tables, i, layout, cost)
    ok = all(trial.place_making_room(c, limit)
             for c in sorted(trial.cells[i], key=lambda c: (-c.cost, c.row_offset, c.col_offset)))
    return trial if ok else None


def _sharding_type(layout: tuple[int, int], n: int) -> int:
    cols, rows = layout
    if rows > 1:
        return common_pb2.ROW_WISE if cols * rows == n else common_pb2.TABLE_ROW_WISE
    return common_pb2.COLUMN_WISE if cols > 1 else common_pb2.TABLE_WISE


def _to_plan(tables: Sequence[common_pb2.TableConfig], dp: list[int], layouts: dict[int, tuple[int, int]],
             state: _State, n: int, version: int) -> common_pb2.ShardingPlan:
    plan = common_pb2.ShardingPlan(version=version, num_shards=n)
    plan.tables.extend(tables)
    plan.data_parallel.extend(tables[i].name for i in dp)
    for i in sorted(state.cells):
        kind = _sharding_type(layouts[i], n)
        for c in sorted(state.cells[i], key=lambda c: (c.col_offset, c.row_offset)):
            plan.slices.add(shard=c.shard, slice=common_pb2.TableSlice(
                table=tables[i].name, row_offset=c.row_offset, num_rows=c.num_rows, col_offset=c.col_offset,
                num_cols=c.num_cols, sharding_type=kind))
    return plan
