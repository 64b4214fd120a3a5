"""What an operator reads before applying a plan: a summary of one plan and the diff between two.

Both come as JSON-ready dicts (for `--json` and for tests) and as rendered text (rich tables written to a
string) for `coordinator plan show` and `coordinator plan diff`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table

from coordinator.cost import CostModel, ShardCapacity, format_bytes
from coordinator.moves import compute_moves
from coordinator.planner import plan_cost
from protos import common_pb2
from protos.plan import row_bytes, sharding_type_name


def _kind(plan: common_pb2.ShardingPlan, name: str, slices: list[common_pb2.PlacedSlice]) -> str:
    if name in plan.data_parallel:
        return "data_parallel"
    kinds = sorted({sharding_type_name(ps.slice.sharding_type) for ps in slices})
    return "+".join(kinds) if kinds else "none"


def plan_summary(plan: common_pb2.ShardingPlan, cost: CostModel,
                 capacities: Mapping[int, int] | Sequence[ShardCapacity] | None = None) -> dict:
    """Per table its sharding type and slices (owner, rows, columns, bytes, cost); per shard its storage,
    cost and capacity when known; the balance (max / mean estimated cost over the shards)."""
    if capacities is not None and not isinstance(capacities, Mapping):
        capacities = {c.shard: c.memory_bytes for c in capacities}
    slices_of: dict[str, list[common_pb2.PlacedSlice]] = {}
    for ps in plan.slices:
        slices_of.setdefault(ps.slice.table, []).append(ps)
    tables = []
    for t in plan.tables:
        placed = slices_of.get(t.name, [])
        rows = []
        for ps in placed:
            c = cost.slice_cost(t, ps.slice)
            s = ps.slice
            rows.append({"shard": ps.shard, "rows": [s.row_offset, s.row_offset + s.num_rows],
                         "cols": [s.col_offset, s.col_offset + s.num_cols], "bytes": c.storage_bytes,
                         "cost_s": c.cost})
        tables.append({"name": t.name, "num_rows": t.num_rows, "dim": t.dim,
                       "sharding_type": _kind(plan, t.name, placed),
                       "bytes": t.num_rows * row_bytes(t, t.dim) if t.name in plan.data_parallel
                       else sum(r["bytes"] for r in rows),
                       "cost_s": sum(r["cost_s"] for r in rows), "slices": rows})
    pc = plan_cost(plan, cost)
    shards = []
    for s in range(plan.num_shards):
        cap = (capacities or {}).get(s) or None
        shards.append({"shard": s, "slices": sum(1 for ps in plan.slices if ps.shard == s),
                       "bytes": pc.shard_bytes[s], "cost_s": pc.shard_cost[s], "capacity_bytes": cap,
                       "memory_used": pc.shard_bytes[s] / cap if cap else None})
    return {"version": plan.version, "num_shards": plan.num_shards, "tables": tables, "shards": shards,
            "data_parallel": list(plan.data_parallel), "total_bytes": sum(pc.shard_bytes),
            "max_cost_s": pc.max_cost, "mean_cost_s": pc.mean_cost, "balance": pc.balance}


def _render(*tables: Table, lines: Sequence[str] = ()) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=120, force_terminal=False, color_system=None, highlight=False)
    for t in tables:
        console.print(t)
    for line in lines:
        console.print(line)
    return buf.getvalue()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def render_summary(summary: dict) -> str:
    """The summary as two text tables (tables, shards) and a balance line."""
    tt = Table(title=f"plan v{summary['version']}: tables")
    for col in ("table", "rows x dim", "sharding", "slices (shard: rows / cols)", "bytes", "ms/step"):
        tt.add_column(col, justify="right" if col in ("bytes", "ms/step") else "left")
    for t in summary["tables"]:
        cells = ", ".join(f"{s['shard']}: {s['rows'][0]}-{s['rows'][1]}"
                          + ("" if s["cols"] == [0, t["dim"]] else f" / {s['cols'][0]}-{s['cols'][1]}")
                          for s in t["slices"]) or "trainers"
        tt.add_row(t["name"], f"{t['num_rows']} x {t['dim']}", t["sharding_type"], cells,
                   format_bytes(t["bytes"]), _ms(t["cost_s"]))
    st = Table(title=f"plan v{summary['version']}: {summary['num_shards']} shards")
    for col in ("shard", "slices", "bytes", "capacity", "used", "ms/step"):
        st.add_column(col, justify="right")
    for s in summary["shards"]:
        cap = s["capacity_bytes"]
        st.add_row(str(s["shard"]), str(s["slices"]), format_bytes(s["bytes"]),
                   format_bytes(cap) if cap else "?", f"{s['memory_used']:.0%}" if cap else "?", _ms(s["cost_s"]))
    return _render(tt, st, lines=[
        f"balance (max / mean cost): {summary['balance']:.3f}; max {_ms(summary['max_cost_s'])} ms/step, "
        f"mean {_ms(summary['mean_cost_s'])} ms/step; data_parallel: {summary['data_parallel'] or 'none'}"])


def _cells(plan: common_pb2.ShardingPlan) -> dict[int, set[tuple]]:
    out: dict[int, set[tuple]] = {s: set() for s in range(plan.num_shards)}
    for ps in plan.slices:
        s = ps.slice
        out.setdefault(ps.shard, set()).add((s.table, s.row_offset, s.num_rows, s.col_offset, s.num_cols))
    return out


def _cell_dict(cell: tuple) -> dict:
    table, r0, nr, c0, nc = cell
    return {"table": table, "rows": [r0, r0 + nr], "cols": [c0, c0 + nc]}


def plan_diff(old: common_pb2.ShardingPlan, new: common_pb2.ShardingPlan) -> dict:
    """What applying `new` over `old` moves: per table the rows and bytes that cross shards and those
    copied locally (by source -> destination shard), totals, and per shard the slices added and removed.
    Rows are counted per move, so a row split across column slices counts once per column slice;
    bytes are exact. Raises coordinator.moves.MoveError for plans no migration connects."""
    moves = compute_moves(old, new)
    per_table: dict[str, dict] = {}
    for m in moves:
        t = per_table.setdefault(m.table, {"table": m.table, "moved_rows": 0, "moved_bytes": 0, "local_rows": 0,
                                           "local_bytes": 0, "flows": {}})
        where = "local" if m.local else "moved"
        t[f"{where}_rows"] += m.rows
        t[f"{where}_bytes"] += m.bytes
        f = t["flows"].setdefault((m.source_shard, m.dest_shard), {"from": m.source_shard, "to": m.dest_shard,
                                                                   "rows": 0, "bytes": 0})
        f["rows"] += m.rows
        f["bytes"] += m.bytes
    order = {t.name: i for i, t in enumerate(new.tables)}
    tables = []
    for name in sorted(per_table, key=lambda n: (order.get(n, len(order)), n)):
        t = per_table[name]
        t["flows"] = [t["flows"][k] for k in sorted(t["flows"]) if k[0] != k[1]]
        tables.append(t)
    old_cells, new_cells = _cells(old), _cells(new)
    shards = []
    for s in range(max(old.num_shards, new.num_shards)):
        before, after = old_cells.get(s, set()), new_cells.get(s, set())
        shards.append({"shard": s,
                       "added": [_cell_dict(c) for c in sorted(after - before)],
                       "removed": [_cell_dict(c) for c in sorted(before - after)],
                       "bytes_in": sum(m.bytes for m in moves if m.dest_shard == s and not m.local),
                       "bytes_out": sum(m.bytes for m in moves if m.source_shard == s and not m.local)})
    totals = {k: sum(t[k] for t in tables) for k in ("moved_rows", "moved_bytes", "local_rows", "local_bytes")}
    return {"old_version": old.version, "new_version": new.version, "tables": tables, "totals": totals,
            "shards": shards, "changed_tables": [t["table"] for t in tables if t["moved_bytes"] > 0]}


def render_diff(diff: dict) -> str:
    """The diff as text: tables whose rows move, then per shard the slices added / removed and bytes in / out."""
    tt = Table(title=f"plan v{diff['old_version']} -> v{diff['new_version']}: rows that move")
    for col in ("table", "moved rows", "moved bytes", "local rows", "local bytes", "flows (from->to: bytes)"):
        tt.add_column(col, justify="left" if col in ("table", "flows (from->to: bytes)") else "right")
    for t in diff["tables"]:
        if not t["moved_bytes"]:
            continue
        flows = ", ".join(f"{f['from']}->{f['to']}: {format_bytes(f['bytes'])}" for f in t["flows"])
        tt.add_row(t["table"], str(t["moved_rows"]), format_bytes(t["moved_bytes"]), str(t["local_rows"]),
                   format_bytes(t["local_bytes"]), flows)
    st = Table(title="per shard")
    for col in ("shard", "slices added", "slices removed", "bytes in", "bytes out"):
        st.add_column(col, justify="right" if col.startswith("bytes") else "left")
    for s in diff["shards"]:
        if not (s["added"] or s["removed"]):
            continue
        st.add_row(str(s["shard"]), _cell_list(s["added"]), _cell_list(s["removed"]), format_bytes(s["bytes_in"]),
                   format_bytes(s["bytes_out"]))
    tot = diff["totals"]
    line = (f"total: {format_bytes(tot['moved_bytes'])} move between shards ({tot['moved_rows']} rows), "
            f"{format_bytes(tot['local_bytes'])} stay local ({tot['local_rows']} rows)")
    if not diff["changed_tables"] and not any(s["added"] or s["removed"] for s in diff["shards"]):
        return _render(lines=["no changes: every slice stays where it is", line])
    return _render(tt, st, lines=[line])


def _cell_list(cells: list[dict]) -> str:
    return "\n".join(f"{c['table']} rows {c['rows'][0]}-{c['rows'][1]} cols {c['cols'][0]}-{c['cols'][1]}"
                     for c in cells) or "-"
