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
