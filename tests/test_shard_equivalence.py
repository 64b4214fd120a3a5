"""A Lookup/Update sequence over gRPC equals the same sequence computed in-process.

One shard per optimizer holds a table slice (two features sharing it, one weighted), a row slice, a
column slice and a MEAN-pooled table in a second TBE group. The reference is plain torch in float64
(tests/reference.py), initialised like the shard.
"""

from __future__ import annotations

import pytest
import torch

from protos.plan import assignment_from_dict
from protos.table_init import initial_rows
from tests import reference

LR = 0.05
TABLES = [
    {"name": "A", "num_rows": 60, "dim": 8, "features": ["a1", "a2"]},
    {"name": "B", "num_rows": 100, "dim": 8, "features": ["b"]},
    {"name": "C", "num_rows": 40, "dim": 16, "features": ["c"]},
    {"name": "D", "num_rows": 30, "dim": 4, "features": ["d"], "pooling": "mean"},
]
SLICES = [
    {"table": "A", "row_offset": 0, "num_rows": 60, "col_offset": 0, "num_cols": 8, "sharding_type": "table_wise"},
    {"table": "B", "row_offset": 30, "num_rows": 50, "col_offset": 0, "num_cols": 8, "sharding_type": "row_wise"},
    {"table": "C", "row_offset": 0, "num_rows": 40, "col_offset": 4, "num_cols": 8, "sharding_type": "column_wise"},
    {"table": "D", "row_offset": 0, "num_rows": 30, "col_offset": 0, "num_cols": 4, "sharding_type": "table_wise"},
]
FEATURES = ["a1", "a2", "b", "c", "d"]
FEATURE_SLICE = {"a1": 0, "a2": 0, "b": 1, "c": 2, "d": 3}


def shard_config(optimizer: str, **extra) -> dict:
    tables = [dict(t, optimizer={"type": optimizer, "learning_rate": LR}) for t in TABLES]
    return {"plan_version": 3, "shard_id": 0, "seed": 7, "tables": tables, "slices": SLICES, **extra}


def reference_tables(config: dict) -> list[reference.RefTable]:
    a = assignment_from_dict(config)
    out = []
    for s in a.slices:
        t = next(t for t in a.tables if t.name == s.table)
        w = initial_rows(t, config["seed"], s.row_offset, s.row_offset + s.num_rows, s.col_offset,
                         s.col_offset + s.num_cols)
        out.append(reference.RefTable(w, config["tables"][0]["optimizer"]["type"], LR,
                                      mean=t.pooling == 2))
    return out


def random_batch(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = [SLICES[FEATURE_SLICE[f]]["num_rows"] for f in FEATURES]
    lengths = torch.randint(0, 5, (len(FEATURES), batch), generator=gen)
    values = torch.cat([torch.randint(0, r, (int(n),), generator=gen)
                        for r, n in zip(rows, lengths.sum(1), strict=True)])
    weights = torch.rand(values.numel(), generator=gen) + 0.5
    # only a1 is weighted: every other feature sends 1.0 (MEAN-pooled d must)
    start = int(lengths[0].sum())
    weights[start:] = 1.0
    return lengths.flatten(), values, weights


def reference_step(refs, lengths, values, weights, grad, batch):
    """Pooled outputs of the step, then the exact update of every slice (shared tables merge ids first)."""
    lengths2 = lengths.view(len(FEATURES), batch)
    offs = [0, *torch.cumsum(lengths2.sum(1), 0).tolist()]
    outs, col = [], 0
    per_slice: dict[int, tuple[list, list]] = {}
    for k, f in enumerate(FEATURES):
        t = refs[FEATURE_SLICE[f]]
        ids, w = values[offs[k] : offs[k + 1]], weights[offs[k] : offs[k + 1]]
        outs.append(reference.pooled(t, lengths2[k], ids, w))
        d = t.weights.shape[1]
        g = reference.row_grads(t, lengths2[k], ids, w, grad[:, col : col + d])
        per_slice.setdefault(FEATURE_SLICE[f], ([], []))[0].append(ids)
        per_slice[FEATURE_SLICE[f]][1].append(g)
        col += d
    for idx, (ids, gs) in per_slice.items():
        reference.apply(refs[idx], torch.cat(ids), torch.cat(gs))
    return torch.cat(outs, dim=1)


def export_state(client, slice_index: int, rows: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from protos import codec

    ws, states = [], []
    for chunk in client.export_rows(slice_index, 0, rows, chunk_rows=17):
        ws.append(codec.decode(chunk.weights).clone())
        states.append([codec.decode(s).clone() for s in chunk.optimizer_state])
    return torch.cat(ws), [torch.cat(parts) for parts in zip(*states, strict=True)]


@pytest.mark.parametrize("optimizer", ["exact_sgd", "exact_adagrad", "exact_rowwise_adagrad"])
def test_lookup_update_sequence_matches_in_process(shard_factory, optimizer):
    config = shard_config(optimizer)
    _, client = shard_factory(config)
    refs = reference_tables(config)
    gen = torch.Generator().manual_seed(11)
    batch = 16
    for step in range(6):
        lengths, values, weights = random_batch(gen, batch)
        res = client.lookup(FEATURES, batch, lengths, values, weights, step=step)
        grad = torch.randn(batch, sum(res.dims), generator=gen)
        expected = reference_step(refs, lengths, values, weights, grad, batch)
        assert res.dims == [8, 8, 8, 8, 4]
        torch.testing.assert_close(res.embeddings.double(), expected, atol=1e-6, rtol=1e-5)
        upd = client.update(res.handle, grad)
        assert upd.applied_step == step
    for idx, ref in enumerate(refs):
        w, states = export_state(client, idx, ref.weights.shape[0])
        torch.testing.assert_close(w.double(), ref.weights, atol=1e-6, rtol=0)
        if optimizer == "exact_sgd":
            assert states == []
        else:
            torch.testing.assert_close(states[0].double().view(ref.state.shape), ref.state, atol=1e-6, rtol=1e-6)
    # the weights really moved (the comparison is not of two untouched tables)
    assert not torch.allclose(refs[0].weights, reference_tables(config)[0].weights)
    info = client.info()
    assert info.lookups == 6 and info.updates == 6 and info.applied_step == 5


def test_fp16_and_bf16_wire_stay_close(shard_factory):
    config = shard_config("exact_rowwise_adagrad")
    _, client = shard_factory(config)
    gen = torch.Generator().manual_seed(3)
    lengths, values, weights = random_batch(gen, 8)
    exact = client.lookup(FEATURES, 8, lengths, values, weights, no_grad=True).embeddings
    for dtype in (torch.float16, torch.bfloat16):
        res = client.lookup(FEATURES, 8, lengths, values, weights, no_grad=True, wire_dtype=dtype)
        assert res.handle == ""
        torch.testing.assert_close(res.embeddings, exact.to(dtype).float(), atol=0, rtol=0)
    step0 = client.lookup(FEATURES, 8, lengths, values, weights, step=0)
    client.update(step0.handle, torch.randn(8, 36, generator=gen), wire_dtype=torch.bfloat16)
    after = client.lookup(FEATURES, 8, lengths, values, weights, no_grad=True).embeddings
    assert not torch.equal(after, exact)
