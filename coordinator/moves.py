"""Row moves between two plans: which rectangle of which slice goes where.

A move copies rows [row_start, row_end) and columns [src_col_start, +num_cols) of a source slice (its
index in the source shard's assignment) into a destination slice of the new plan. Shard ids name the
same members in both plans, so a move whose source and destination shard agree is a local copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from protos import common_pb2
from protos.plan import row_bytes, shard_slices


class MoveError(ValueError):
    """Two plans no row migration can connect; the message names the table."""


@dataclass(frozen=True)
class Move:
    table: str
    source_shard: int
    source_slice: int
    row_start: int  # local rows of the source slice
    row_end: int
    src_col_start: int  # local columns of the source slice
    num_cols: int
    dest_shard: int
    dest_slice: int
    dest_row_start: int
    dest_col_start: int
    bytes: int

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def local(self) -> bool:
        return self.source_shard == self.dest_shard

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": self.rows, "local": self.local}


def compute_moves(old: common_pb2.ShardingPlan, new: common_pb2.ShardingPlan) -> list[Move]:
    """Every rectangle the new plan's slices need from the old plan's, destination-major."""
    old_tables = {t.name: t for t in old.tables}
    for t in new.tables:
        o = old_tables.get(t.name)
        if o is None:
            raise MoveError(f"table {t.name!r}: not in the current plan (new tables need a new job)")
        if (o.num_rows, o.dim) != (t.num_rows, t.dim):
            raise MoveError(f"table {t.name!r}: {o.num_rows}x{o.dim} in the current plan, {t.num_rows}x{t.dim} "
                            "in the new one")
        if (t.name in old.data_parallel) != (t.name in new.data_parallel):
            raise MoveError(f"table {t.name!r}: moving between data_parallel and the shards needs a restart from "
                            "a checkpoint, not a live rollout")
    sources: dict[str, list[tuple[int, int, common_pb2.TableSlice]]] = {}
    for shard, slices in shard_slices(old).items():
        for i, s in enumerate(slices):
            sources.setdefault(s.table, []).append((shard, i, s))
    moves = []
    for dest, slices in sorted(shard_slices(new).items()):
        for j, d in enumerate(slices):
            table = old_tables[d.table]
            for src, i, s in sources.get(d.table, []):
                r0, r1 = max(s.row_offset, d.row_offset), min(s.row_offset + s.num_rows, d.row_offset + d.num_rows)
                c0, c1 = max(s.col_offset, d.col_offset), min(s.col_offset + s.num_cols, d.col_offset + d.num_cols)
                if r0 >= r1 or c0 >= c1:
                    continue
                moves.append(Move(table=d.table, source_shard=src, source_slice=i,
                                  row_start=r0 - s.row_offset, row_end=r1 - s.row_offset,
                                  src_col_start=c0 - s.col_offset, num_cols=c1 - c0,
                                  dest_shard=dest, dest_slice=j, dest_row_start=r0 - d.row_offset,
                                  dest_col_start=c0 - d.col_offset, bytes=(r1 - r0) * row_bytes(table, c1 - c0)))
    return moves


def split_moves(moves: list[Move], max_rows: int) -> list[Move]:
    """Cuts moves into pieces of at most `max_rows` rows (progress, rate limiting, smaller retries)."""
    out = []
    for m in moves:
        for r0 in range(m.row_start, m.row_end, max_rows):
            r1 = min(r0 + max_rows, m.row_end)
            out.append(Move(m.table, m.source_shard, m.source_slice, r0, r1, m.src_col_start, m.num_cols, m.dest_shard,
                            m.dest_slice, m.dest_row_start + (r0 - m.row_start), m.dest_col_start,
                            m.bytes * (r1 - r0) // m.rows))
    return out
