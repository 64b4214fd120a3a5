"""The planner, its cost model, plan validation and the operator reports (in-process, no servers)."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from coordinator.cost import CostModel, ShardCapacity
from coordinator.moves import MoveError, row_bytes
from coordinator.planner import PlanningError, plan_cost, propose
from coordinator.report import plan_diff, plan_summary, render_diff, render_summary
from coordinator.validation import plan_violations
from protos import common_pb2
from protos.model_config import ModelConfig
from protos.plan import simple_plan, split_range, validate_plan

CRITEO = ModelConfig.load("configs/criteo_kaggle.yaml")
ADAGRAD = common_pb2.OptimizerConfig(type=common_pb2.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1)


def table(name: str, rows: int, dim: int = 64, opt: int = common_pb2.EXACT_ROWWISE_ADAGRAD) -> common_pb2.TableConfig:
    return common_pb2.TableConfig(name=name, num_rows=rows, dim=dim, features=[f"f_{name}"],
                                  optimizer=common_pb2.OptimizerConfig(type=opt, learning_rate=0.1))


def equal_caps(n: int, each: int) -> list[ShardCapacity]:
    return [ShardCapacity(s, each) for s in range(n)]


def kinds(plan: common_pb2.ShardingPlan) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {name: {common_pb2.DATA_PARALLEL} for name in plan.data_parallel}
    for ps in plan.slices:
        out.setdefault(ps.slice.table, set()).add(ps.slice.sharding_type)
    return out


def check_valid(plan: common_pb2.ShardingPlan, tables, caps: list[ShardCapacity], cost: CostModel) -> None:
    validate_plan(plan, SimpleNamespace(tables=list(tables)))  # only .tables is read
    assert plan_violations(plan, model_tables=tables, alive_shards={c.shard: c.memory_bytes for c in caps},
                           cost=cost) == []
    used = plan_cost(plan, cost).shard_bytes
    assert all(u <= c.memory_bytes for u, c in zip(used, caps, strict=True)), (used, caps)


# ---- cost model ----

def test_slice_cost_counts_storage_lookup_and_wire_by_share():
    cm = CostModel(batch_size=1000, pooling_factors={"f_t": 10.0})
    t = table("t", 1000, 64)
    whole = cm.cell_cost(t, 1000, 64)
    assert whole.storage_bytes == 1000 * (64 * 4 + 4)  # weights + row-wise Adagrad state
    assert whole.lookup_floats == 1000 * 10 * 64
    half_rows, half_cols = cm.cell_cost(t, 500, 64), cm.cell_cost(t, 1000, 32)
    assert half_rows.lookup_floats == half_cols.lookup_floats == whole.lookup_floats / 2
    # row-wise: half the ids, but the full pooled output and gradient; column-wise: every id, half the output
    assert whole.wire_bytes - half_rows.wire_bytes == 1000 * 10 * 8 / 2
    assert whole.wire_bytes - half_cols.wire_bytes == 2 * 1000 * 32 * 4
    assert whole.cost == pytest.approx(whole.lookup_floats * 4e-10 + whole.wire_bytes * 1e-9)
    # a feature's factor beats its table's; tables default to default_pooling
    cm2 = CostModel(pooling_factors={"t": 3.0, "f_t": 7.0}, default_pooling=2.0)
    assert cm2.pooling(t) == 7.0 and cm2.pooling(table("u", 10)) == 2.0
    assert CostModel(pooling_factors={"u": 3.0}).pooling(table("u", 10)) == 3.0


def test_split_range_tiles_and_keeps_columns_aligned():
    assert split_range(64, 5, 4) == [(0, 16), (16, 12), (28, 12), (40, 12), (52, 12)]
    assert split_range(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert split_range(6, 4, 4) == [(0, 2), (2, 2), (4, 1), (5, 1)]  # not a multiple of 4: plain split


# ---- planner on the Criteo-Kaggle model ----

@pytest.mark.parametrize("shards", [4, 8])
@pytest.mark.parametrize("headroom", [1.5, 1.05])
def test_criteo_balance_target_met_with_memory_respected(shards, headroom):
    cm = CostModel()
    total = sum(cm.table_bytes(t) for t in CRITEO.tables)
    caps = equal_caps(shards, int(total * headroom / shards))
    plan = propose(CRITEO.tables, caps, cm)
    check_valid(plan, CRITEO.tables, caps, cm)
    validate_plan(plan, CRITEO)
    assert plan_cost(plan, cm).balance <= 1.05
    assert set(plan.data_parallel) == {t.name for t in CRITEO.tables if cm.table_bytes(t) <= 64 * 1024}


def test_propose_is_deterministic_and_beats_round_robin():
    cm = CostModel()
    caps = equal_caps(8, 150_000_000)
    a, b = propose(CRITEO.tables, caps, cm), propose(list(CRITEO.tables), caps, cm)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    assert plan_cost(simple_plan(CRITEO, 8), cm).balance > 1.2 > plan_cost(a, cm).balance


# ---- sharding types ----

def test_every_sharding_type_is_chosen_where_it_fits():
    cm = CostModel()
    caps = equal_caps(4, 16_000 * row_bytes(table("x", 1), 64))  # 16,000 rows of D=64 per shard
    # balance_target=10: no balancing splits, so the types come from size and width alone
    tables = [table("tiny", 10), table("plain", 1_000), table("plain2", 1_000),
              table("huge", 57_600)]  # 3.6 shards: rows over all four (row_wise)
    plan = propose(tables, caps, cm, balance_target=10.0)
    check_valid(plan, tables, caps, cm)
    k = kinds(plan)
    assert k["tiny"] == {common_pb2.DATA_PARALLEL} and "tiny" not in {ps.slice.table for ps in plan.slices}
    assert k["plain"] == k["plain2"] == {common_pb2.TABLE_WISE}
    assert k["huge"] == {common_pb2.ROW_WISE}
    assert len({ps.shard for ps in plan.slices if ps.slice.table == "huge"}) == 4

    tables = [table("plain", 2_000),
              table("big", 24_000),  # 1.5 shards: rows over two of them (table_row_wise)
              table("wide", 2_000, dim=512)]  # at least column_wise_min_dim wide
    plan = propose(tables, caps, cm, balance_target=10.0)
    check_valid(plan, tables, caps, cm)
    k = kinds(plan)
    assert k["plain"] == {common_pb2.TABLE_WISE}
    assert k["big"] == {common_pb2.TABLE_ROW_WISE}
    assert sum(ps.slice.table == "big" for ps in plan.slices) == 2
    assert k["wide"] == {common_pb2.COLUMN_WISE}
    assert sorted(ps.slice.num_cols for ps in plan.slices if ps.slice.table == "wide") == [128] * 4


def test_hot_table_is_spread_row_wise_to_fix_imbalance():
    # pooling 500: ids (8 bytes each) and lookup work dominate, so rows (not columns) are split
    cm = CostModel(pooling_factors={"hot": 500.0})
    tables = [table("hot", 100_000)] + [table(f"c{i}", 50_000) for i in range(7)]
    caps = equal_caps(4, 10**9)
    plan = propose(tables, caps, cm)
    check_valid(plan, tables, caps, cm)
    assert kinds(plan)["hot"] <= {common_pb2.ROW_WISE, common_pb2.TABLE_ROW_WISE}
    assert sum(ps.slice.table == "hot" for ps in plan.slices) >= 2
    whole = propose(tables, caps, cm, balance_target=100.0)  # greedy only: hot stays whole
    assert kinds(whole)["hot"] == {common_pb2.TABLE_WISE}
    assert plan_cost(plan, cm).max_cost < 0.7 * plan_cost(whole, cm).max_cost


def test_exact_rowwise_optimizers_keeps_their_columns_together():
    cm = CostModel()
    tables = [table("wide_rowwise", 2_000, dim=512),
              table("wide_adagrad", 2_000, dim=512, opt=common_pb2.EXACT_ADAGRAD),
              *[table(f"t{i}", 3_000) for i in range(6)]]
    caps = equal_caps(4, 10**9)
    plan = propose(tables, caps, cm, exact_rowwise_optimizers=True)
    check_valid(plan, tables, caps, cm)
    column_split = {ps.slice.table for ps in plan.slices if ps.slice.num_cols < 512 and ps.slice.table.startswith("w")}
    assert column_split == {"wide_adagrad"}
    assert not any(ps.slice.num_cols < 64 for ps in plan.slices if ps.slice.table.startswith("t"))
    loose = propose(tables, caps, cm)
    assert {ps.slice.table for ps in loose.slices if ps.slice.num_cols < 512} >= {"wide_rowwise", "wide_adagrad"}


def test_wide_and_huge_table_gets_a_valid_grid():
    cm = CostModel()
    t = table("grid", 40_000, dim=512)
    one_col_piece = 40_000 * row_bytes(t, 128)
    caps = equal_caps(8, int(one_col_piece * 0.6))  # each 128-column piece needs two shards
    plan = propose([t], caps, cm, balance_target=10.0)
    check_valid(plan, [t], caps, cm)
    cells = {(ps.slice.col_offset, ps.slice.num_cols) for ps in plan.slices}
    assert len(cells) == 4 and len(plan.slices) == 8 and len({ps.shard for ps in plan.slices}) == 8


def test_memory_respected_with_unequal_capacities():
    cm = CostModel()
    total = sum(cm.table_bytes(t) for t in CRITEO.tables)
    caps = [ShardCapacity(s, int(total * f)) for s, f in enumerate([0.45, 0.2, 0.2, 0.1, 0.1])]
    plan = propose(CRITEO.tables, caps, cm)
    check_valid(plan, CRITEO.tables, caps, cm)


def test_explicit_data_parallel_list_wins_over_the_threshold():
    cm = CostModel()
    caps = equal_caps(4, 10**9)
    plan = propose(CRITEO.tables, caps, cm, data_parallel=["t8"])
    assert list(plan.data_parallel) == ["t8"]
    check_valid(plan, CRITEO.tables, caps, cm)
    with pytest.raises(PlanningError, match=r"data_parallel: unknown tables \['nope'\]"):
        propose(CRITEO.tables, caps, cm, data_parallel=["nope"])


# ---- refusals ----

def test_impossible_requests_are_refused_with_the_reason():
    cm = CostModel()
    per_row = row_bytes(table("x", 1), 64)
    with pytest.raises(PlanningError, match=r"shard 3: capacity 10 bytes is too small for any slice .*'b', needs 132"):
        propose([table("a", 1000), table("b", 500, dim=32)], [*equal_caps(3, 10**9), ShardCapacity(3, 10)], cm)
    with pytest.raises(PlanningError, match=r"table 'big' needs 2.6 MB but the 4 shards offer 1.04 MB in total"):
        propose([table("big", 10_000)], equal_caps(4, 1000 * per_row), cm)
    with pytest.raises(PlanningError, match=r"the 3 sharded tables need 2.34 MB but the 2 shards offer 2.08 MB"):
        propose([table(n, 3000) for n in "abc"], equal_caps(2, 4000 * per_row), cm)
    with pytest.raises(PlanningError, match="no shards"):
        propose([table("a", 10)], [], cm)
    with pytest.raises(PlanningError, match=r"shard ids must be 0..1 once each, got \[0, 2\]"):
        propose([table("a", 10)], [ShardCapacity(0, 10**6), ShardCapacity(2, 10**6)], cm)
    with pytest.raises(PlanningError, match="table 'a': listed twice"):
        propose([table("a", 10), table("a", 20)], equal_caps(1, 10**6), cm)
    # fits in total, but no split into slices on distinct shards does: 4 rows of 260 bytes, halves of 520
    with pytest.raises(PlanningError, match=r"table 'a' \(1.04 kB\) does not fit: split into 2 slices"):
        propose([table("a", 4)], [ShardCapacity(0, 270), ShardCapacity(1, 1000)], cm, data_parallel_max_bytes=0)


# ---- validation ----

def _small_plan() -> tuple[common_pb2.ShardingPlan, list[common_pb2.TableConfig]]:
    tables = [table("a", 100), table("b", 100), table("c", 10)]
    plan = common_pb2.ShardingPlan(version=3, num_shards=2, tables=tables, data_parallel=["c"])
    for shard, name, r0, nr in [(0, "a", 0, 50), (1, "a", 50, 50), (1, "b", 0, 100)]:
        plan.slices.add(shard=shard, slice=common_pb2.TableSlice(table=name, row_offset=r0, num_rows=nr,
                                                                 num_cols=64, sharding_type=common_pb2.ROW_WISE))
    return plan, tables


def test_valid_hand_built_plan_has_no_violations():
    plan, tables = _small_plan()
    assert plan_violations(plan, model_tables=tables, alive_shards={0: 0, 1: 10**6}) == []


@pytest.mark.parametrize("break_it, message", [
    (lambda p: setattr(p.slices[0].slice, "num_rows", 60), "table 'a': row slices overlap on rows [50, 60)"),
    (lambda p: p.slices[1].slice.MergeFrom(common_pb2.TableSlice(row_offset=60, num_rows=40)),
     "table 'a': rows [50, 60) not covered"),
    (lambda p: setattr(p.slices[1].slice, "num_rows", 40), "table 'a': rows [90, 100) not covered"),
    (lambda p: setattr(p.slices[2].slice, "num_cols", 32), "table 'b': columns [32, 64) not covered"),
    (lambda p: p.slices.add(shard=0, slice=common_pb2.TableSlice(table="zz", num_rows=1, num_cols=64)),
     "slice 3 on shard 0: unknown table 'zz'"),
    (lambda p: setattr(p.slices[2], "shard", 5), "slice 2 of table 'b': shard 5 outside [0, 2)"),
    (lambda p: p.slices.add(shard=0, slice=common_pb2.TableSlice(table="c", num_rows=10, num_cols=64)),
     "table 'c': data_parallel but also has 1 slices"),
    (lambda p: p.data_parallel.append("b"), "table 'b': data_parallel but also has 1 slices"),
    (lambda p: setattr(p.slices[2].slice, "num_rows", 101), "rows [0, 101) x columns [0, 64) outside"),
    (lambda p: p.slices.pop(2), "table 'b': no slices and not data_parallel"),
    (lambda p: setattr(p, "version", 0), "plan version 0: must be positive"),
])
def test_each_kind_of_violation_is_named(break_it, message):
    plan, tables = _small_plan()
    break_it(plan)
    found = plan_violations(plan, model_tables=tables)
    assert len(found) == 1 and message in found[0], found


def test_model_mismatch_dead_owner_and_capacity_are_named():
    plan, tables = _small_plan()
    assert plan_violations(plan, model_tables=[*tables, table("d", 5)]) == [
        "table 'd': in the model but not in the plan"]
    assert plan_violations(plan, model_tables=tables[1:]) == ["table 'a': in the plan but not in the model"]
    other = [table("a", 100, dim=32), *tables[1:]]
    assert "table 'a': the plan has 100 rows x 64" in plan_violations(plan, model_tables=other)[0]
    assert plan_violations(plan, alive_shards={0: 0}) == [
        "shard 1: owns slices of ['a', 'b'] but is not registered or not alive"]
    assert plan_violations(plan, alive_shards={0: 0, 1: 100 * 260}) == [
        "shard 1: needs 39 kB for its slices, capacity 26 kB"]
    assert plan_violations(plan, alive_shards={0: 50 * 260 - 1, 1: 0}) == [
        "shard 0: needs 13000 bytes for its slices, capacity 12999 bytes"]


def test_three_problems_give_three_violations():
    plan, tables = _small_plan()
    plan.slices[1].slice.row_offset, plan.slices[1].slice.num_rows = 60, 40  # gap in 'a'
    plan.slices[2].shard = 0  # shard 0 now over capacity
    plan.data_parallel.append("ghost")  # unknown data-parallel table
    found = plan_violations(plan, model_tables=tables, alive_shards={0: 100 * 260, 1: 0})
    assert len(found) == 3, found
    assert any("'a'" in v and "not covered" in v for v in found)
    assert any(v.startswith("shard 0: needs") for v in found)
    assert any("'ghost'" in v for v in found)


# ---- reports ----

def test_plan_summary_and_render():
    cm = CostModel()
    caps = equal_caps(4, 300_000_000)
    plan = propose(CRITEO.tables, caps, cm)
    summary = plan_summary(plan, cm, caps)
    json.dumps(summary)
    assert summary["balance"] == pytest.approx(plan_cost(plan, cm).balance)
    assert sum(s["bytes"] for s in summary["shards"]) == summary["total_bytes"] == sum(plan_cost(plan, cm).shard_bytes)
    by_name = {t["name"]: t for t in summary["tables"]}
    assert by_name["t8"]["sharding_type"] == "data_parallel" and by_name["t8"]["slices"] == []
    assert by_name["t2"]["slices"][0]["rows"] == [0, 500_000]
    assert all(s["capacity_bytes"] == 300_000_000 and s["memory_used"] <= 1 for s in summary["shards"])
    text = render_summary(summary)
    for name in ("t2", "t25", "data_parallel", "balance (max / mean cost)", "300 MB"):
        assert name in text
    assert plan_summary(plan, cm)["shards"][0]["capacity_bytes"] is None


def test_plan_diff_counts_moved_and_local_bytes():
    cm = CostModel()
    old = propose(CRITEO.tables, equal_caps(4, 300_000_000), cm)
    new = propose(CRITEO.tables, equal_caps(5, 250_000_000), cm, version=2, data_parallel=list(old.data_parallel))
    diff = plan_diff(old, new)
    json.dumps(diff)
    total = sum(plan_cost(new, cm).shard_bytes)
    tot = diff["totals"]
    # every byte of the new plan comes from somewhere (row-wise optimizer state is per column slice, so a
    # column split changes the total slightly)
    assert tot["moved_bytes"] + tot["local_bytes"] == pytest.approx(total, rel=1e-3) and tot["moved_bytes"] > 0
    assert sum(s["bytes_in"] for s in diff["shards"]) == sum(s["bytes_out"] for s in diff["shards"]) == \
        tot["moved_bytes"]
    assert diff["shards"][4]["removed"] == [] and diff["shards"][4]["added"]  # the new shard only gains
    for t in diff["tables"]:
        assert sum(f["bytes"] for f in t["flows"]) == t["moved_bytes"]
    text = render_diff(diff)
    assert "move between shards" in text and diff["changed_tables"][0] in text
    same = plan_diff(old, old)
    assert same["totals"]["moved_bytes"] == 0 and same["totals"]["local_bytes"] == sum(plan_cost(old, cm).shard_bytes)
    assert "no changes" in render_diff(same)
    with pytest.raises(MoveError, match="data_parallel"):
        plan_diff(old, propose(CRITEO.tables, equal_caps(4, 300_000_000), cm, data_parallel_max_bytes=0))


def test_balance_counts_every_shard():
    plan, tables = _small_plan()
    cm = CostModel()
    pc = plan_cost(plan, cm)
    a_half = cm.cell_cost(tables[0], 50, 64).cost
    assert pc.shard_cost == pytest.approx([a_half, a_half + cm.cell_cost(tables[1], 100, 64).cost])
    assert pc.balance == pytest.approx(max(pc.shard_cost) / (sum(pc.shard_cost) / 2))
    assert Counter(pc.shard_bytes) == Counter([50 * 260, 150 * 260])
