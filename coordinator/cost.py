"""The planner's cost model: what one slice stores, how much lookup work it does, what it puts on the wire.

Storage (weights + optimizer state) is a constraint checked against shard capacities, never traded
against time. The scalar `cost` is estimated seconds per training step on the owning shard:

    cost = lookup_floats * lookup_seconds_per_float + wire_bytes * wire_seconds_per_byte
           (+ storage_bytes * storage_seconds_per_byte, 0 by default)

Ids are assumed uniform over a table's rows, so a row-wise slice does the table's lookup work and
receives its ids in proportion to its share of the rows; it still returns a full [B, cols] partial sum
and receives the full gradient (the trainer sums row-wise partials), so splitting rows spreads work
and ids but not pooled bytes. A column-wise slice gets every id and does work in proportion to its
columns. The constants come from DESIGN.md's measurements on the Criteo-Kaggle tables (TBE forward +
backward: 6.4 ms at pooling 1 and 33 ms at pooling 20 for 26 x 2048 bags of D=64, i.e. about 0.4 ns per
gathered float; Python gRPC on loopback moves about 1 GB/s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import common_pb2
from protos.plan import row_bytes


def format_bytes(n: float) -> str:
    """Decimal units with three significant digits ("1.3 GB"), as operators read capacities."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"


@dataclass(frozen=True)
class ShardCapacity:
    """What one embedding shard offers the planner: bytes for weights + optimizer state."""

    shard: int
    memory_bytes: int
    device: str = "cpu"


@dataclass(frozen=True)
class SliceCost:
    """Per-step estimates for one slice on its shard."""

    storage_bytes: int
    lookup_floats: float  # gathered (and in backward, updated) floats per step
    wire_bytes: float  # ids + lengths in, pooled embeddings out, gradients in
    cost: float  # estimated seconds per step


@dataclass
class CostModel:
    """Per-step cost of slices; pooling factors are mean ids per bag, keyed by feature or table name."""

    batch_size: int = 2048
    pooling_factors: dict[str, float] = field(default_factory=dict)
    default_pooling: float = 1.0
    wire_bytes_per_float: int = 4  # 2 when embeddings and gradients travel as fp16 / bf16
    id_bytes: int = 8  # int64 ids and lengths
    lookup_seconds_per_float: float = 4e-10
    wire_seconds_per_byte: float = 1e-9
    storage_seconds_per_byte: float = 0.0  # storage is a constraint; raise to prefer light shards

    def pooling(self, table: common_pb2.TableConfig) -> float:
        """Ids per sample over all of the table's features (a feature's factor beats its table's)."""
        features = list(table.features) or [table.name]
        table_default = self.pooling_factors.get(table.name, self.default_pooling)
        return sum(self.pooling_factors.get(f, table_default) for f in features)

    def table_bytes(self, table: common_pb2.TableConfig) -> int:
        return table.num_rows * row_bytes(table, table.dim)

    def slice_cost(self, table: common_pb2.TableConfig, s: common_pb2.TableSlice) -> SliceCost:
        return self.cell_cost(table, s.num_rows, s.num_cols)

    def cell_cost(self, table: common_pb2.TableConfig, num_rows: int, num_cols: int) -> SliceCost:
        """Cost of a slice of `num_rows` x `num_cols` of `table` wherever its offsets are."""
        share = num_rows / table.num_rows if table.num_rows else 0.0
        bags = self.batch_size * max(1, len(table.features))
        ids = self.batch_size * self.pooling(table) * share
        lookup = ids * num_cols
        wire = (ids + bags) * self.id_bytes + 2 * bags * num_cols * self.wire_bytes_per_float
        storage = num_rows * row_bytes(table, num_cols)
        seconds = (lookup * self.lookup_seconds_per_float + wire * self.wire_seconds_per_byte
                   + storage * self.storage_seconds_per_byte)
        return SliceCost(storage_bytes=storage, lookup_floats=lookup, wire_bytes=wire, cost=seconds)
