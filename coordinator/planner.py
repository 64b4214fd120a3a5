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
only on the inputs (ties break by table order and shard id) unless the search's time budget runs out.

The search's cost is bounded: a candidate split is applied to one placement and undone from a journal
(not tried on a copy of every table's cells), each step's candidates are capped by a work estimate (twin
tables tried once, split counts spread at scale), and a trial count and a wall-clock budget end the
search with the best valid plan found so far. 2,000 tables over 256 shards plan in under a second or
two (`python -m benchmarks.planner_scale`).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from coordinator.cost import CostModel, ShardCapacity, format_bytes
from protos import common_pb2
from protos.plan import row_bytes, split_range

_EPS = 1e-9
# Search bounds (see `propose`): candidate splits per search step, in all, and seconds of local search.
_STEP_WORK = 512 * 16 * 16  # trials x shards^2: every candidate split is tried up to 512 trials at 16 shards
DEFAULT_MAX_TRIALS = 20_000
_REPLACE_ALL_MAX_WORK = 2048  # cells x shards
_WIDE_STEP = 4  # step work, times _STEP_WORK, when a step found nothing
DEFAULT_TIME_BUDGET_S = 6.0
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


@dataclass(eq=False)
class _Cell:
    table: int
    row_offset: int
    num_rows: int
    col_offset: int
    num_cols: int
    cost: float
    bytes: int
    shard: int = -1


# Journal entries: ("put" | "take", cell, shard, load before) or ("cells", table, old cells, new cells).
_Op = tuple


@dataclass
class _State:
    """A placement: which shard holds each cell, and what each shard carries.

    Trials change it in place and `undo` back to a `mark()`, so a candidate split costs its own moves,
    not a copy of every table's cells (which at hundreds of tables made one search step take minutes)."""

    capacity: list[int]
    load: list[float]
    used: list[int]
    holds: list[set[int]]  # table indices with a cell on each shard
    on: list[set[_Cell]]  # the cells on each shard
    cells: dict[int, list[_Cell]] = field(default_factory=dict)  # table index -> its cells
    journal: list[_Op] = field(default_factory=list)

    @classmethod
    def empty(cls, capacity: list[int]) -> _State:
        n = len(capacity)
        return cls(capacity=capacity, load=[0.0] * n, used=[0] * n, holds=[set() for _ in range(n)],
                   on=[set() for _ in range(n)])

    def copy(self) -> _State:
        """An independent snapshot (for the best plan seen); trials use mark / undo instead."""
        out = _State.empty(self.capacity)
        out.load, out.used = list(self.load), list(self.used)
        out.holds = [set(h) for h in self.holds]
        for t, cs in self.cells.items():
            mine = out.cells[t] = [_Cell(**c.__dict__) for c in cs]
            for c in mine:
                if c.shard >= 0:
                    out.on[c.shard].add(c)
        return out

    def fits(self, cell: _Cell, shard: int) -> bool:
        return cell.table not in self.holds[shard] and self.used[shard] + cell.bytes <= self.capacity[shard]

    def put(self, cell: _Cell, shard: int) -> None:
        self.journal.append(("put", cell, shard, self.load[shard]))
        cell.shard = shard
        self.load[shard] += cell.cost
        self.used[shard] += cell.bytes
        self.holds[shard].add(cell.table)
        self.on[shard].add(cell)

    def take(self, cell: _Cell) -> None:
        s = cell.shard
        self.journal.append(("take", cell, s, self.load[s]))
        self.load[s] -= cell.cost
        self.used[s] -= cell.bytes
        self.holds[s].discard(cell.table)
        self.on[s].discard(cell)
        cell.shard = -1

    def set_cells(self, table: int, cells: list[_Cell]) -> None:
        self.journal.append(("cells", table, self.cells.get(table), cells))
        self.cells[table] = cells

    def mark(self) -> int:
        return len(self.journal)

    def undo(self, mark: int) -> list[_Op]:
        """Revert every change since `mark` (loads to their exact earlier values, so float sums do not
        drift over thousands of trials); returns the changes, oldest first, for `redo`."""
        done = self.journal[mark:]
        for op in reversed(done):
            if op[0] == "put":
                self.take(op[1])
                self.load[op[2]] = op[3]
            elif op[0] == "take":
                self.put(op[1], op[2])
                self.load[op[2]] = op[3]
            else:
                self.cells[op[1]] = op[2]
        del self.journal[mark:]
        return done

    def redo(self, ops: list[_Op]) -> None:
        for op in ops:
            if op[0] == "put":
                self.put(op[1], op[2])
            elif op[0] == "take":
                self.take(op[1])
            else:
                self.set_cells(op[1], op[3])

    def by_load(self) -> list[int]:
        return sorted(range(len(self.load)), key=lambda s: (self.load[s], s))

    def commit(self) -> None:
        """Forget the journal: what is placed now is kept."""
        self.journal.clear()

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

    def place_making_room(self, cell: _Cell, limit: float, order: list[int] | None = None) -> bool:
        """Onto the least-loaded shard that stays under `limit`, first moving one of its cells to another
        shard under `limit` if that is what makes room (the light shards are often full of cold tables).

        `order`: the shards by (load, id), kept sorted here as loads change, so placing the many cells of
        one table sorts the shards once rather than once per cell."""
        if order is None:
            order = self.by_load()
        mark = self.mark()
        ok = self._place_making_room(cell, limit, order)
        for s in {op[2] for op in self.journal[mark:]}:
            order.remove(s)
            bisect.insort(order, s, key=lambda s: (self.load[s], s))
        return ok

    def _place_making_room(self, cell: _Cell, limit: float, order: list[int]) -> bool:
        bound = limit * (1 - _EPS)
        for d in order:
            if self.load[d] + cell.cost >= bound:
                break
            if cell.table in self.holds[d]:
                continue
            if self.fits(cell, d):
                self.put(cell, d)
                return True
            mine = sorted(self.on[d], key=lambda x: (x.cost, -x.bytes, x.table, x.col_offset, x.row_offset))
            for x in mine:
                if self.used[d] - x.bytes + cell.bytes > self.capacity[d] or x.table == cell.table:
                    continue
                for e in order:  # loads are unchanged until a move returns, so the order still holds
                    if self.load[e] + x.cost >= bound:
                        break
                    if e != d and self.fits(x, e):
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


@dataclass
class _Budget:
    """Search work left: candidate splits to evaluate and a wall-clock deadline. When either runs out the
    search stops and the best valid placement found so far is the plan."""

    trials: int
    deadline: float

    def spend(self) -> bool:
        """Take one trial; False when none is left."""
        if self.trials <= 0 or time.perf_counter() >= self.deadline:
            self.trials = 0
            return False
        self.trials -= 1
        return True

    def share(self, parts: int) -> _Budget:
        """An even part of what is left (rounded up) for one of `parts` searches run one after another;
        what a search does not use goes to the next."""
        left = max(0.0, self.deadline - time.perf_counter())
        part = _Budget(trials=-(-self.trials // parts), deadline=time.perf_counter() + left / parts)
        self.trials -= part.trials
        return part

    def give_back(self, part: _Budget) -> None:
        self.trials += part.trials


def propose(tables: Sequence[common_pb2.TableConfig], capacities: Sequence[ShardCapacity], cost: CostModel, *,
            version: int = 1, data_parallel_max_bytes: int = 64 * 1024, column_wise_min_dim: int = 256,
            balance_target: float = 1.05, max_splits: int = 64,
            data_parallel: Collection[str] | None = None,
            exact_rowwise_optimizers: bool = False,
            max_trials: int = DEFAULT_MAX_TRIALS,
            time_budget_s: float = DEFAULT_TIME_BUDGET_S) -> common_pb2.ShardingPlan:
    """A plan for `tables` over the shards of `capacities` (ids 0..N-1); PlanningError says why none exists.

    `data_parallel` names the tables kept in the trainers instead of those of at most
    `data_parallel_max_bytes` (a re-plan passes the current plan's list: a live rollout cannot move a
    table between the trainers and the shards).

    `max_splits` bounds the local search's extra splits: each one adds wire bytes, so the search only
    splits while that lowers the most loaded shard. `max_trials` (candidate splits evaluated, each with
    its moves and swaps) and `time_budget_s` (seconds of local search) bound its work: when either runs
    out the best valid plan found so far is returned. The trial bound is deterministic; the time bound
    only guards slow machines (the defaults keep 2,000 tables over 256 shards within seconds).

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

    budget = _Budget(trials=max_trials, deadline=time.perf_counter() + time_budget_s)
    start = _greedy(tables, layouts, caps, cost)
    _improve(start)
    start.commit()
    # Searches that judge a split differently and that do or do not re-place every table after one; the
    # lowest most-loaded shard wins, then the least total cost. Each gets an even share of the budget left.
    # A fresh placement of every table per trial costs cells x shards; past a few dozen of each it is skipped.
    cells = sum(r * c for r, c in layouts.values())
    modes = [(better, replace_all) for better in (_leximax_better, _squares_better) for replace_all in (False, True)
             if not replace_all or cells * n <= _REPLACE_ALL_MAX_WORK]
    results = []
    memo = _CellMemo(cost)
    for k, (better, replace_all) in enumerate(modes):
        part = budget.share(len(modes) - k)
        results.append(_search(tables, layouts, max_cols, start.copy(), memo, balance_target, max_splits, better,
                               replace_all, part))
        budget.give_back(part)
    layouts, state = min(results, key=lambda r: _worth(r[1]))
    return _to_plan(tables, dp, layouts, state, n, version)


def _search(tables: Sequence[common_pb2.TableConfig], layouts: dict[int, tuple[int, int]], max_cols: dict[int, int],
            state: _State,
            cost: CostModel | _CellMemo, balance_target: float, max_splits: int,
            better: Callable[[list[float], list[float]], bool],
            replace_all: bool, budget: _Budget) -> tuple[dict[int, tuple[int, int]], _State]:
    """Split while the balance misses the target and a split helps by `better`; return the best placement
    seen by `_worth`, so stepping-stone splits that never lowered the most loaded shard are undone.

    At scale (see `_split_once`) a split that unloads one of several equally most-loaded shards does not
    count against `max_splits`: hundreds of tables of one cost over hundreds of shards leave dozens of such
    ties, each needing its own split; `budget` bounds those."""
    best = (layouts, state.copy())
    hints: dict[tuple, tuple[int, int]] = {}
    splits = 0
    while splits < max_splits:
        if best[1].balance() <= balance_target or budget.trials <= 0:
            break  # the best by `_worth`: a split that only adds work can lift the mean to the target
        top = max(state.load)
        found = _split_once(tables, layouts, max_cols, state, cost, better, replace_all, budget, hints=hints)
        if found is None:  # before giving up, a wider step: more candidates and split counts
            found = _split_once(tables, layouts, max_cols, state, cost, better, replace_all, budget, hints=hints,
                                step_work=_STEP_WORK * _WIDE_STEP)
        if found is None:
            break
        layouts, state, large = found
        if not large or max(state.load) < top * (1 - _EPS):
            splits += 1
        if _worth(state) < _worth(best[1]):
            best = (layouts, state.copy())
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


_Spec = tuple[int, int, int, int, float, int]  # row offset, rows, col offset, cols, cost, bytes


class _CellMemo(dict[tuple[int, tuple[int, int]], list[_Spec]]):
    """Cell shapes and costs by (table, layout): a search re-places every table after each candidate split,
    and asks for the same cells thousands of times."""

    def __init__(self, cost: CostModel) -> None:
        super().__init__()
        self.cost = cost


def _cells(tables: Sequence[common_pb2.TableConfig], i: int, layout: tuple[int, int],
           cost: CostModel | _CellMemo) -> list[_Cell]:
    specs = cost.get((i, layout)) if isinstance(cost, _CellMemo) else None
    if specs is None:
        t = tables[i]
        model = cost.cost if isinstance(cost, _CellMemo) else cost
        specs = []
        for c0, nc in split_range(t.dim, layout[0], 4):
            for r0, nr in split_range(t.num_rows, layout[1]):
                sc = model.cell_cost(t, nr, nc)
                specs.append((r0, nr, c0, nc, sc.cost, sc.storage_bytes))
        if isinstance(cost, _CellMemo):
            cost[(i, layout)] = specs
    return [_Cell(i, *s) for s in specs]


def _place_all(tables: Sequence[common_pb2.TableConfig], layouts: dict[int, tuple[int, int]], caps: list[int],
               cost: CostModel | _CellMemo) -> tuple[_State | None, _Cell | None]:
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
        mine = sorted(state.on[src], key=lambda c: (-c.cost, c.table, c.col_offset, c.row_offset))
        order = [s for s in state.by_load() if s != src]
        if not _move(state, src, top, mine, order) and not _swap(state, src, top, mine, order):
            return


def _move(state: _State, src: int, top: float, mine: list[_Cell], order: list[int]) -> bool:
    """The first cell of `mine` that fits on the least-loaded shard able to take it below `top`."""
    bound = top * (1 - _EPS)
    for dst in order:
        if state.load[dst] >= bound:
            break  # costs are never negative, and the shards after this one are loaded more
        for c in mine:
            if state.load[dst] + c.cost < bound and state.fits(c, dst):
                state.take(c)
                state.put(c, dst)
                return True
    return False


def _swap(state: _State, src: int, top: float, mine: list[_Cell], order: list[int]) -> bool:
    """Exchange a cell of `src` for a cheaper one elsewhere so that neither shard reaches `top`; tries the
    pairs in the order (costliest of mine; least-loaded shard, cheapest of its cells)."""
    bound = top * (1 - _EPS)
    theirs = {}
    for a in mine:
        for dst in order:
            if state.load[dst] >= bound:
                break  # the swap adds a.cost - b.cost > 0 to dst, and later shards are loaded more
            if a.table in state.holds[dst]:
                continue
            if dst not in theirs:
                theirs[dst] = sorted(state.on[dst], key=lambda c: (c.cost, c.table, c.col_offset, c.row_offset))
            for b in theirs[dst]:
                d = a.cost - b.cost
                if d <= 0:
                    break  # cheapest first: the rest cost at least as much as a
                if state.load[dst] + d >= bound or b.table in state.holds[src]:
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


def _spread(lo: int, hi: int, dense: bool) -> list[int]:
    """lo..hi, every value when `dense`, else the first four and then doubling steps (and hi): at dozens of
    shards a table's split counts are too many to try each one at every step."""
    if dense or hi - lo < 4:
        return list(range(lo, hi + 1))
    out = list(range(lo, lo + 4))
    step = 4
    while lo + step < hi:
        out.append(lo + step)
        step *= 2
    return [*out, hi]


def _split_once(tables: Sequence[common_pb2.TableConfig], layouts: dict[int, tuple[int, int]],
                max_cols: dict[int, int], state: _State,
                cost: CostModel | _CellMemo, better: Callable[[list[float], list[float]], bool], replace_all: bool,
                budget: _Budget, step_work: int = _STEP_WORK, hints: dict[tuple, tuple[int, int]] | None = None,
                ) -> tuple[dict[int, tuple[int, int]], _State, bool] | None:
    """Try more row or column parts for each table on the most loaded shards; keep the best result (after
    moves and swaps) if it beats the current placement.

    Every candidate is tried while trials x shards^2 is at most `step_work` (a trial's placement and moves
    grow with the shards, and so do the cells to place; this covers a few dozen tables over 16 shards).
    Beyond that (a "large" step), tables whose cells cost the same on equally loaded shards are tried once
    (with hundreds of equal tables most ties are such twins), split counts are spread (`_spread`), the
    candidates go costliest first, and the step ends with the first one that has an improving split,
    after at most `step_work / shards^2` trials (16 at least). `hints` remembers the split that won a
    large step for a table shape (layout and cell costs) and tries it first for the next table of that
    shape, ending the step when it improves. `budget` may stop a step early; its best trial so far is
    then the result. Returns the layouts, the placement and whether the step was large."""
    n = len(state.load)
    top = max(state.load)
    tops = [s for s in range(n) if state.load[s] >= top * (1 - _EPS)]  # all of them, as ties are common
    on_top = {c.table for s in tops for c in state.on[s]}
    heaviest = {i: max(c.cost for c in state.cells[i] if c.shard >= 0 and state.load[c.shard] >= top * (1 - _EPS))
                for i in on_top}
    candidates = sorted(on_top, key=lambda i: (-heaviest[i], i))

    def options(i: int, dense: bool) -> list[tuple[int, int]]:
        cols, rows = layouts[i]
        more_rows = [(cols, r) for r in _spread(rows + 1, min(n // cols, tables[i].num_rows), dense)]
        more_cols = [(c, rows) for c in _spread(cols + 1, min(n // rows, max_cols[i]), dense)]
        return more_rows + more_cols

    trials = [(i, layout) for i in candidates for layout in options(i, True)]
    step_trials = max(16, step_work // (n * n))
    large = len(trials) > step_trials
    hints = {} if hints is None else hints
    hinted: set[tuple[int, tuple[int, int]]] = set()

    def shape(i: int) -> tuple:
        return layouts[i], tuple(sorted(round(c.cost * 1e12) for c in state.cells[i]))

    if large:
        seen: set[tuple] = set()
        trials = []
        for i in candidates:
            twin = (shape(i), tuple(sorted(round(state.load[c.shard] * 1e12) for c in state.cells[i])))
            if twin in seen:
                continue
            seen.add(twin)
            mine = options(i, False)
            hint = hints.get(shape(i))
            if hint is not None and hint in mine:
                hinted.add((i, hint))
                mine = [hint, *(x for x in mine if x != hint)]
            trials += [(i, layout) for layout in mine]
        trials = trials[:step_trials]

    state.commit()
    base_key = state.key()
    best_key: list[float] | None = None
    best: tuple[dict[int, tuple[int, int]], list[_Op] | _State] | None = None
    won_by_hint = False
    for k, (i, layout) in enumerate(trials):
        if large and best is not None and (won_by_hint or trials[k - 1][0] != i):
            break  # the best split of the costliest table that has one: first improvement, not best of all
        if not budget.spend():
            break
        new_layouts = {**layouts, i: layout}
        if _replace_table(tables, i, layout, state, cost):
            _improve(state)
            key = state.key()
            if better(key, best_key or base_key):
                best_key = key
                best = (new_layouts, state.undo(0))
                won_by_hint = (i, layout) in hinted
            else:
                state.undo(0)
        else:
            state.undo(0)
        if replace_all and len(state.on) * sum(map(len, state.on)) <= _REPLACE_ALL_MAX_WORK:
            trial = _place_all(tables, new_layouts, state.capacity, cost)[0]
            if trial is not None:
                _improve(trial)
                key = trial.key()
                if better(key, best_key or base_key):
                    best_key = key
                    best = (new_layouts, trial)
    if best is None:
        return None
    new_layouts, found = best
    if large:
        changed = next(i for i in new_layouts if new_layouts[i] != layouts[i])
        hints[shape(changed)] = new_layouts[changed]
    if isinstance(found, _State):
        found.commit()
        return new_layouts, found, large
    state.redo(found)
    state.commit()
    return new_layouts, state, large


def _replace_table(tables: Sequence[common_pb2.TableConfig], i: int, layout: tuple[int, int], state: _State,
                   cost: CostModel | _CellMemo) -> bool:
    """Replace table i's cells in `state` by those of `layout`, placed onto the least-loaded shards (making
    room there if needed); False when one finds no room (a fresh placement of every table may still find
    some). Changes `state` in place: the caller undoes it to its mark."""
    limit = max(state.load)
    for c in state.cells[i]:
        state.take(c)
    state.set_cells(i, _cells(tables, i, layout, cost))
    order = state.by_load()
    return all(state.place_making_room(c, limit, order)
               for c in sorted(state.cells[i], key=lambda c: (-c.cost, c.row_offset, c.col_offset)))


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
