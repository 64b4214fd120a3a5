"""The planner at hundreds of tables and dozens of shards (validity and balance, not timing), its search
bounds, its in-place trials, and `plan propose` refusing a bad model config with one line."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.cost import CostModel, ShardCapacity
from coordinator.planner import _cells, _greedy, plan_cost, propose
from protos import common_pb2
from protos.plan import row_bytes, split_range
from tests.test_planner import check_valid, equal_caps

ROOT = Path(__file__).resolve().parents[1]


def synthetic(count: int, seed: int = 0, dim: int = 128) -> list[common_pb2.TableConfig]:
    """As benchmarks/planner_scale.py: rows log-uniform over 10^2..10^7.3, row-wise Adagrad."""
    rng = random.Random(seed)
    opt = common_pb2.OptimizerConfig(type=common_pb2.EXACT_ROWWISE_ADAGRAD, learning_rate=0.05)
    return [common_pb2.TableConfig(name=f"t{i}", num_rows=int(10 ** rng.uniform(2, 7.3)), dim=dim,
                                   features=[f"c{i}"], optimizer=opt) for i in range(count)]


def share_caps(tables: list[common_pb2.TableConfig], shards: int, headroom: float) -> list[ShardCapacity]:
    total = sum(t.num_rows * row_bytes(t, t.dim) for t in tables)
    return equal_caps(shards, int(headroom * total / shards))


def every_table_tiled(plan: common_pb2.ShardingPlan, tables: list[common_pb2.TableConfig]) -> None:
    """Each sharded table's slices cover its rows x columns exactly once, on distinct shards."""
    dp = set(plan.data_parallel)
    by_table: dict[str, list] = {}
    for ps in plan.slices:
        by_table.setdefault(ps.slice.table, []).append(ps)
    assert set(by_table) | dp == {t.name for t in tables} and not set(by_table) & dp
    for t in tables:
        if t.name in dp:
            continue
        slices = by_table[t.name]
        assert sum(ps.slice.num_rows * ps.slice.num_cols for ps in slices) == t.num_rows * t.dim, t.name
        assert len({ps.shard for ps in slices}) == len(slices), t.name


@pytest.mark.parametrize(("count", "shards", "headroom", "seed"),
                         [(300, 48, 2.0, 0), (300, 48, 2.0, 2), (300, 40, 1.1, 1), (200, 96, 2.0, 0)])
def test_hundreds_of_tables_over_dozens_of_shards_valid_and_balanced(count, shards, headroom, seed):
    tables = synthetic(count, seed)
    cm = CostModel()
    caps = share_caps(tables, shards, headroom)
    plan = propose(tables, caps, cm)
    check_valid(plan, tables, caps, cm)  # tiled exactly, owners in range, memory respected, no violations
    every_table_tiled(plan, tables)
    assert plan_cost(plan, cm).balance <= 1.05


def test_search_bound_returns_a_valid_plan_no_worse_than_greedy():
    tables = synthetic(300, 2)
    cm = CostModel()
    caps = share_caps(tables, 64, 2.0)
    greedy = propose(tables, caps, cm, max_trials=0)  # no local search at all
    check_valid(greedy, tables, caps, cm)
    assert plan_cost(greedy, cm).balance > 1.05  # so the bounded searches below have work to do
    for kwargs in ({"max_trials": 3}, {"max_trials": 40}, {"time_budget_s": 0.0}, {"time_budget_s": 0.05}):
        plan = propose(tables, caps, cm, **kwargs)
        check_valid(plan, tables, caps, cm)
        every_table_tiled(plan, tables)
        assert plan_cost(plan, cm).max_cost <= plan_cost(greedy, cm).max_cost * (1 + 1e-9), kwargs
    full = propose(tables, caps, cm)
    assert plan_cost(full, cm).balance <= 1.05
    # the trial bound is deterministic: the same inputs give the same plan
    a, b = propose(tables, caps, cm, max_trials=40), propose(tables, caps, cm, max_trials=40)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_trial_undo_restores_the_placement_exactly():
    tables = synthetic(40, 3)
    cm = CostModel()
    caps = [c.memory_bytes for c in share_caps(tables, 8, 1.5)]
    layouts = {i: (1, 1) for i in range(len(tables))}
    state = _greedy(tables, layouts, caps, cm)
    state.commit()
    shards = {id(c): c.shard for cs in state.cells.values() for c in cs}
    before = (list(state.load), list(state.used), [set(h) for h in state.holds], [set(o) for o in state.on],
              {i: list(cs) for i, cs in state.cells.items()}, shards)
    mark = state.mark()
    for c in state.cells[5]:
        state.take(c)
    state.set_cells(5, _cells(tables, 5, (4, 2), cm))
    order = state.by_load()
    for c in state.cells[5]:
        assert state.place_making_room(c, max(state.load) * 10, order)
    assert order == state.by_load()  # kept sorted while placing
    ops = state.undo(mark)
    after = (state.load, state.used, state.holds, state.on, state.cells,
             {id(c): c.shard for cs in state.cells.values() for c in cs})
    assert after == before  # loads bit for bit, not up to float noise
    state.redo(ops)
    assert sorted((c.col_offset, c.row_offset) for c in state.cells[5]) == [
        (c, r) for c in (0, 32, 64, 96) for r, _ in split_range(tables[5].num_rows, 2)]
    assert len({c.shard for c in state.cells[5]}) == 8 and state.journal[mark:] == ops


def _propose_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "coordinator.cli", "plan", "propose", "--config", str(config), *args],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_propose_refuses_a_bad_model_config_in_one_line(tmp_path):
    bad = tmp_path / "two_dims.yaml"
    bad.write_text("tables:\n"
                   "  - {name: a, num_rows: 100, dim: 64, features: [fa]}\n"
                   "  - {name: b, num_rows: 100, dim: 32, features: [fb]}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tables: [\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- just a list\n")
    cases = [(bad, "tables: the dot interaction needs one embedding dim, got [32, 64]"),
             (broken, "line 2, column 1"),
             (listed, "list.yaml: expected a mapping at the top level"),
             (tmp_path / "missing.yaml", "No such file or directory")]
    for path, expected in cases:
        r = _propose_cli(path, "--shards", "2")
        assert r.returncode == 2, r.stderr
        assert r.stdout == ""
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"coordinator plan propose: {path}: "), r.stderr
        assert expected in lines[0] and lines[0].count(str(path)) == 1
    r = _propose_cli(ROOT / "configs" / "criteo_kaggle.yaml", "--shards", "0")
    assert r.returncode == 2 and r.stderr.strip() == "coordinator plan propose: --shards 0: must be at least 1"
