"""Plans and the router, in-process: every layout reassembles exactly the unsharded pooled lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protos import common_pb2
from protos.model_config import ModelConfig
from protos.plan import PlanError, assignment, dump_plan, load_plan, simple_plan, validate_plan
from trainer.router import Router

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig.load(ROOT / "configs" / "tiny.yaml")


def grid_plan() -> common_pb2.ShardingPlan:
    """items split into 2 column groups, each row-split differently; the rest table-wise."""
    plan = simple_plan(MODEL, 3, kinds={"items": common_pb2.DATA_PARALLEL})
    del plan.data_parallel[:]
    for shard, r0, nr, c0, nc in [(0, 0, 100, 0, 3), (1, 100, 400, 0, 3), (2, 0, 250, 3, 5), (0, 250, 50, 3, 5),
                                  (1, 300, 200, 3, 5)]:
        plan.slices.add(shard=shard, slice=common_pb2.TableSlice(
            table="items", row_offset=r0, num_rows=nr, col_offset=c0, num_cols=nc,
            sharding_type=common_pb2.TABLE_ROW_WISE))
    return plan


PLANS = {
    "table_wise": lambda: simple_plan(MODEL, 2),
    "mixed": lambda: simple_plan(MODEL, 3, kinds={"users": common_pb2.ROW_WISE, "items": common_pb2.COLUMN_WISE,
                                                   "cities": common_pb2.TABLE_ROW_WISE}),
    "grid": grid_plan,
}


def random_batch(gen: torch.Generator, batch: int, weighted: bool):
    feats = MODEL.features
    lengths = torch.randint(0, 4, (len(feats), batch), generator=gen)
    values = torch.cat([torch.randint(0, f.num_rows, (int(n),), generator=gen)
                        for f, n in zip(feats, lengths.sum(1), strict=True)])
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return lengths.flatten(), values, weights


def pooled(table: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths.to(torch.int64))
    rows = table[ids.to(torch.int64)]
    if w is not None:
        rows = rows * w[:, None]
    return torch.zeros(lengths.numel(), table.shape[1]).index_add_(0, bag, rows)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", list(PLANS))
def test_router_reassembles_unsharded_lookup(name, weighted):
    plan = PLANS[name]()
    router = Router(plan, MODEL)
    gen = torch.Generator().manual_seed(1)
    tables = {t.name: torch.randn(t.num_rows, t.dim, generator=gen) for t in MODEL.tables}
    batch = 9
    lengths, values, weights = random_batch(gen, batch, weighted)
    requests = router.input_dist([f.name for f in MODEL.features], lengths, values, weights)
    responses = {}
    for shard, req in requests.items():
        a = assignment(plan, shard)
        assert req.values.dtype == torch.int32
        offs = [0, *torch.cumsum(req.lengths.view(len(req.features), batch).sum(1), 0).tolist()]
        outs = []
        for k, (feature, slice_index) in enumerate(req.features):
            s = a.slices[slice_index]
            table = next(f.table for f in MODEL.features if f.name == feature)
            assert s.table == table
            ids = req.values[offs[k] : offs[k + 1]]
            assert ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < s.num_rows)
            w = None if req.weights is None else req.weights[offs[k] : offs[k + 1]]
            part = tables[table][s.row_offset : s.row_offset + s.num_rows, s.col_offset : s.col_offset + s.num_cols]
            outs.append(pooled(part, req.lengths.view(len(req.features), batch)[k], ids, w))
        responses[shard] = torch.cat(outs, dim=1)
    got = router.output_dist(responses)
    lengths2 = lengths.view(len(MODEL.features), batch)
    offs = [0, *torch.cumsum(lengths2.sum(1), 0).tolist()]
    expected = torch.cat([
        pooled(tables[f.table], lengths2[i], values[offs[i] : offs[i + 1]],
               None if weights is None else weights[offs[i] : offs[i + 1]])
        for i, f in enumerate(MODEL.features)], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    grad = torch.randn(batch, len(MODEL.features) * MODEL.embedding_dim, generator=gen)
    grads = router.grad_dist(grad)
    for shard, req in requests.items():
        assert grads[shard].shape == (batch, sum(req.dims))
    # each tile gets exactly the columns it produced, the same for every row range
    for shard, req in requests.items():
        col = 0
        for feature, slice_index in req.features:
            s = assignment(plan, shard).slices[slice_index]
            fi = [f.name for f in MODEL.features].index(feature)
            want = grad[:, fi * 8 + s.col_offset : fi * 8 + s.col_offset + s.num_cols]
            assert torch.equal(grads[shard][:, col : col + s.num_cols], want)
            col += s.num_cols


def test_plan_roundtrip_and_assignment(tmp_path):
    plan = PLANS["mixed"]()
    path = tmp_path / "plan.json"
    path.write_text(dump_plan(plan))
    back = load_plan(path)
    assert back == plan
    a = assignment(plan, 1)
    assert a.plan_version == 1 and a.shard_id == 1
    assert {s.table for s in a.slices} == {t.name for t in a.tables}


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.slices[0].slice.__setattr__("num_rows", p.slices[0].slice.num_rows - 1), "users': rows gap"),
    (lambda p: p.slices[2].slice.__setattr__("num_rows", p.slices[2].slice.num_rows - 1),
     "users': rows .* not covered"),
    (lambda p: p.slices[1].slice.__setattr__("row_offset", p.slices[1].slice.row_offset - 5), "overlap"),
    (lambda p: p.slices[0].__setattr__("shard", 7), "shard 7"),
    (lambda p: p.tables[0].__setattr__("num_rows", 999), "table 'users'"),
    (lambda p: p.slices.add(shard=0, slice=common_pb2.TableSlice(table="ghost", num_rows=1, num_cols=8)), "ghost"),
])
def test_invalid_plans_are_refused_naming_the_table(mutate, message):
    plan = simple_plan(MODEL, 3, kinds={"users": common_pb2.ROW_WISE})
    mutate(plan)
    with pytest.raises(PlanError, match=message):
        validate_plan(plan, MODEL)


def test_router_rejects_out_of_range_ids():
    router = Router(PLANS["mixed"](), MODEL)
    lengths = torch.ones(len(MODEL.features), dtype=torch.int64)
    values = torch.tensor([5, 7, 499, 500, 3])  # one id per feature; city has 40 rows
    with pytest.raises(ValueError, match=r"feature 'city': id 500 outside its table's rows \[0, 40\)"):
        router.input_dist([f.name for f in MODEL.features], lengths, values)


def _per_route_output_dist(router: Router, embeddings: dict[int, torch.Tensor]) -> torch.Tensor:
    """The reference: one slice-add per (feature, slice) route, offsets recomputed on the fly."""
    batch = next(iter(embeddings.values())).shape[0]
    out = torch.zeros(batch, len(router.features) * router.dim)
    for shard, routes in router.shard_routes.items():
        col = 0
        for r in routes:
            c0 = r.feature_index * router.dim + r.col_offset
            out[:, c0 : c0 + r.num_cols] += embeddings[shard][:, col : col + r.num_cols]
            col += r.num_cols
    return out


def _per_route_grad_dist(router: Router, grad: torch.Tensor) -> dict[int, torch.Tensor]:
    out = {}
    for shard, routes in router.shard_routes.items():
        if routes:
            out[shard] = torch.cat([grad[:, r.feature_index * router.dim + r.col_offset :
                                         r.feature_index * router.dim + r.col_offset + r.num_cols] for r in routes], 1)
    return out


def test_dist_at_1000_features_equals_the_per_route_semantics():
    """1,000 features over 64 shards in every layout (table-, row-, column-, table-row-wise): the router's
    output_dist / grad_dist give exactly what a plain loop over routes gives, and the vectorized id check
    still names the feature and the id."""
    gen = torch.Generator().manual_seed(7)
    opt = common_pb2.OptimizerConfig(type=common_pb2.EXACT_SGD, learning_rate=0.1)
    tables = [common_pb2.TableConfig(name=f"t{i}", num_rows=int(torch.randint(64, 5000, (1,), generator=gen)), dim=8,
                                     features=[f"f{i}"], optimizer=opt) for i in range(1000)]
    model = ModelConfig(tables=tables, bottom_mlp=[16, 8], top_mlp=[16, 1])
    layouts = [common_pb2.TABLE_WISE, common_pb2.ROW_WISE, common_pb2.COLUMN_WISE, common_pb2.TABLE_ROW_WISE]
    kinds = {t.name: layouts[int(torch.randint(0, 4, (1,), generator=gen))] for t in tables}
    router = Router(simple_plan(model, 64, kinds=kinds, row_shards=3), model)
    assert {r.num_cols for rs in router.shard_routes.values() for r in rs} != {8}  # column splits are present
    batch = 16
    lengths = torch.randint(0, 3, (1000 * batch,), generator=gen)
    per = lengths.view(1000, batch).sum(1)
    values = torch.cat([torch.randint(0, t.num_rows, (int(n),), generator=gen)
                        for t, n in zip(tables, per, strict=True)])
    requests = router.input_dist([f"f{i}" for i in range(1000)], lengths, values)
    assert sum(r.values.numel() for r in requests.values()) >= values.numel()
    responses = {s: torch.randn(batch, sum(r.dims), generator=gen) for s, r in requests.items()}
    torch.testing.assert_close(router.output_dist(responses), _per_route_output_dist(router, responses),
                               rtol=1e-6, atol=1e-6)
    grad = torch.randn(batch, 1000 * 8, generator=gen)
    expected = _per_route_grad_dist(router, grad)
    got = router.grad_dist(grad)
    assert got.keys() == expected.keys()
    for s in expected:
        assert torch.equal(got[s], expected[s])
    bad = values.clone()
    fi = int((per > 0).nonzero()[500, 0])  # a feature with ids, halfway through
    at = int(per[:fi].sum())  # its first id
    bad[at] = tables[fi].num_rows
    with pytest.raises(ValueError, match=rf"feature 'f{fi}': id {tables[fi].num_rows} outside"):
        router.input_dist([f"f{i}" for i in range(1000)], lengths, bad)
