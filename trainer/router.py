"""input_dist / output_dist: ids to the shards that hold their rows, pooled slices back into features.

Per feature, a table is tiled into column groups, each split into row ranges (table-wise: one tile;
row-wise and table-row-wise: one column group of several row ranges; column-wise: several column
groups of one row range). Ids go to every column group (column-wise sends the same ids to each) and,
within a group, to the row range that holds them, rebased to the slice. Outputs of a column group's
row ranges are summed (each holds a partial sum); column groups are placed side by side. Gradients
go back the same way: each tile gets the columns it produced, unchanged for every row range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protos import common_pb2
from protos.model_config import ModelConfig
from protos.plan import placements, validate_plan


@dataclass(frozen=True)
class Route:
    feature: str
    feature_index: int  # position among the routed (sharded) features
    table: str
    shard: int
    slice_index: int  # the slice's index in the shard's assignment
    row_offset: int
    num_rows: int
    col_offset: int
    num_cols: int


@dataclass
class ShardRequest:
    """One shard's part of a batch: one Lookup covering all its (feature, slice) pairs."""

    features: list[tuple[str, int]]
    lengths: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor | None
    dims: list[int] = field(default_factory=list)


@dataclass
class _Tile:
    col_offset: int
    num_cols: int
    routes: list[Route]  # row ranges, ascending
    bounds: torch.Tensor  # row_offset of routes[1:], for bucketize
    offsets: torch.Tensor  # row_offset of every route


class Router:
    def __init__(self, plan: common_pb2.ShardingPlan, model: ModelConfig) -> None:
        validate_plan(plan, model)  # data_parallel tables have no slices: their features get no routes
        self.plan = plan
        self.dim = model.embedding_dim
        self.features = [f.name for f in model.features]
        self.rows = [f.num_rows for f in model.features]
        self._rows = torch.tensor(self.rows, dtype=torch.int64)
        self.num_shards = plan.num_shards
        table_of = {f.name: f.table for f in model.features}
        placed = placements(plan)
        self.tiles: list[list[_Tile]] = []
        self.shard_routes: dict[int, list[Route]] = {s: [] for s in range(plan.num_shards)}
        for fi, f in enumerate(self.features):
            groups: dict[tuple[int, int], list[Route]] = {}
            for p in placed:
                s = p.slice
                if s.table != table_of[f]:
                    continue
                r = Route(f, fi, s.table, p.shard, p.index, s.row_offset, s.num_rows, s.col_offset, s.num_cols)
                groups.setdefault((s.col_offset, s.num_cols), []).append(r)
            tiles = []
            for (c0, nc), routes in sorted(groups.items()):
                routes.sort(key=lambda r: r.row_offset)
                tiles.append(_Tile(c0, nc, routes, torch.tensor([r.row_offset for r in routes[1:]]),
                                   torch.tensor([r.row_offset for r in routes])))
                for r in routes:
                    self.shard_routes[r.shard].append(r)
            self.tiles.append(tiles)
        # where each route's columns sit in its shard's response, and in the model's [B, F * D]. output_dist
        # and grad_dist stay a slice op per route: both are memory-bound (a [B, F * D] pass), and one
        # index_add / index_select per shard over the columns measured about 2x slower at 1,000 features
        self._cols: dict[int, list[tuple[int, int, int]]] = {
            shard: [] for shard, routes in self.shard_routes.items() if routes}
        for shard, routes in self.shard_routes.items():
            col = 0
            for r in routes:
                self._cols[shard].append((col, r.feature_index * self.dim + r.col_offset, r.num_cols))
                col += r.num_cols
        max_rows = max(r.num_rows for routes in self.shard_routes.values() for r in routes)
        self.id_dtype = torch.int32 if max_rows < 2**31 else torch.int64

    def input_dist(self, keys: list[str], lengths: torch.Tensor, values: torch.Tensor,
                   weights: torch.Tensor | None = None) -> dict[int, ShardRequest]:
        """Splits a feature-major jagged batch into one request per shard."""
        if keys != self.features:
            raise ValueError(f"keys: expected the model's features {self.features}, got {keys}")
        n_feat = len(keys)
        batch = lengths.numel() // n_feat
        lengths2 = lengths.view(n_feat, batch).to(torch.int64)
        per_feature = lengths2.sum(1)
        offs = [0, *torch.cumsum(per_feature, 0).tolist()]
        self._check_ids(keys, per_feature, values, offs)
        parts: dict[Route, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        for fi in range(n_feat):
            vals = values[offs[fi] : offs[fi + 1]]
            wts = None if weights is None else weights[offs[fi] : offs[fi + 1]]
            for tile in self.tiles[fi]:
                if len(tile.routes) == 1:
                    r = tile.routes[0]
                    parts[r] = (lengths2[fi], vals - r.row_offset if r.row_offset else vals, wts)
                    continue
                parts.update(self._bucketize(tile, lengths2[fi], vals, wts, batch))
        out = {}
        for shard, routes in self.shard_routes.items():
            if not routes:
                continue
            ls = [parts[r][0] for r in routes]
            vs = [parts[r][1] for r in routes]
            ws = [parts[r][2] for r in routes] if weights is not None else None
            out[shard] = ShardRequest(
                features=[(r.feature, r.slice_index) for r in routes],
                lengths=torch.cat(ls).to(self.id_dtype), values=torch.cat(vs).to(self.id_dtype),
                weights=torch.cat(ws) if ws is not None else None, dims=[r.num_cols for r in routes])
        return out

    def _check_ids(self, keys: list[str], per_feature: torch.Tensor, values: torch.Tensor, offs: list[int]) -> None:
        """A bad id fails here, naming its feature and the id, not inside a shard or a collective; one
        vectorized pass over every id (a per-feature check is two syncs per feature)."""
        if not values.numel():
            return
        limit = torch.repeat_interleave(self._rows, per_feature)
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            fi = int(torch.searchsorted(torch.tensor(offs[1:]), int(bad.nonzero()[0, 0]), right=True))
            lo, hi = (int(x) for x in torch.aminmax(values[offs[fi] : offs[fi + 1]]))
            raise ValueError(f"feature {keys[fi]!r}: id {lo if lo < 0 else hi} outside its table's "
                             f"rows [0, {self.rows[fi]})")

    @staticmethod
    def _bucketize(tile: _Tile, lengths: torch.Tensor, vals: torch.Tensor, wts: torch.Tensor | None,
                   batch: int) -> dict[Route, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        n = len(tile.routes)
        bucket = torch.bucketize(vals, tile.bounds.to(vals.dtype), right=True)
        bag = torch.repeat_interleave(torch.arange(batch), lengths)
        counts = torch.bincount(bucket * batch + bag, minlength=n * batch).view(n, batch)
        order = torch.argsort(bucket, stable=True)  # keeps bag order inside each row range
        local = vals[order] - tile.offsets.to(vals.dtype)[bucket[order]]
        sizes = counts.sum(1).tolist()
        v_parts = torch.split(local, sizes)
        w_parts = torch.split(wts[order], sizes) if wts is not None else [None] * n
        return {r: (counts[k], v_parts[k], w_parts[k]) for k, r in enumerate(tile.routes)}

    def output_dist(self, embeddings: dict[int, torch.Tensor]) -> torch.Tensor:
        """Shard responses ([B, sum(d)] each) into the model's [B, F * D] (row partials summed)."""
        batch = next(iter(embeddings.values())).shape[0]
        out = torch.zeros(batch, len(self.features) * self.dim)
        for shard, cols in self._cols.items():
            resp = embeddings[shard]
            for src, dst, n in cols:
                out[:, dst : dst + n] += resp[:, src : src + n]
        return out

    def grad_dist(self, grad: torch.Tensor) -> dict[int, torch.Tensor]:
        """The gradient of [B, F * D] back to each shard, in its response's layout."""
        out = {}
        for shard, cols in self._cols.items():
            parts = [grad[:, dst : dst + n] for _, dst, n in cols]
            out[shard] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous()
        return out
