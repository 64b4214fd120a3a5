"""Sync mode: two trainers' steps merge into one update that equals one TBE on the global batch."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)

from protos.plan import assignment_from_dict
from protos.table_init import initial_rows
from tests import reference

TABLES = [{"name": f"t{i}", "num_rows": rows, "dim": 8, "features": [f"f{i}"],
           "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.1}}
          for i, rows in enumerate([50, 200, 7])]
FEATURES = ["f0", "f1", "f2"]
# f3 shares t0 with f0: the shard widens the batch instead of mapping two features to one table.
# fbgemm's CPU TBE is no reference for that: row-wise Adagrad fails on shared tables, and exact Adagrad
# updates each feature's occurrences of a row separately instead of summing them first (as the CUDA
# kernels and this shard do); so this layout is checked against the float64 torch reference.
SHARED = [dict(t, features=t["features"] + (["f3"] if t["name"] == "t0" else []),
               optimizer={"type": "exact_adagrad", "learning_rate": 0.1}) for t in TABLES]
LAYOUTS = {"one_feature_per_table": (TABLES, FEATURES, [0, 1, 2]),
           "shared_table": (SHARED, [*FEATURES, "f3"], [0, 1, 2, 0])}


class InProcessTBE:
    """One fbgemm TBE over the global batch (one feature per table)."""

    def __init__(self, config: dict) -> None:
        a = assignment_from_dict(config)
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(t.num_rows, t.dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for t in a.tables],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1)
        for t, w in zip(a.tables, self.tbe.split_embedding_weights(), strict=True):
            w.detach().copy_(initial_rows(t, config["seed"], 0, t.num_rows, 0, t.dim))

    def step(self, lengths: torch.Tensor, values: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        out = self.tbe(values, torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.flatten()))
        out.backward(grad)
        return out.detach()

    def weights(self) -> list[torch.Tensor]:
        return [w.detach() for w in self.tbe.split_embedding_weights()]


class TorchReference:
    """Exact Adagrad in float64 over the global batch, with shared tables."""

    def __init__(self, config: dict, table_map: list[int]) -> None:
        a = assignment_from_dict(config)
        self.refs = [reference.RefTable(initial_rows(t, config["seed"], 0, t.num_rows, 0, t.dim),
                                        "exact_adagrad", 0.1) for t in a.tables]
        self.table_map = table_map

    def step(self, lengths: torch.Tensor, values: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        offs = [0, *torch.cumsum(lengths.sum(1), 0).tolist()]
        outs, per_table = [], {}
        for f, t in enumerate(self.table_map):
            ids, ref = values[offs[f] : offs[f + 1]], self.refs[t]
            outs.append(reference.pooled(ref, lengths[f], ids, None))
            g = reference.row_grads(ref, lengths[f], ids, None, grad[:, 8 * f : 8 * f + 8])
            per_table.setdefault(t, []).append((ids, g))
        for t, parts in per_table.items():
            reference.apply(self.refs[t], torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return torch.cat(outs, dim=1).float()

    def weights(self) -> list[torch.Tensor]:
        return [r.weights.float() for r in self.refs]


def batch(gen: torch.Generator, b: int, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = rows or [t["num_rows"] for t in TABLES]
    lengths = torch.randint(0, 4, (len(rows), b), generator=gen)
    values = torch.cat([torch.randint(0, r, (int(n),), generator=gen)
                        for r, n in zip(rows, lengths.sum(1), strict=True)])
    return lengths, values


def global_batch(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenates trainers' batches per feature, the layout one TBE sees for the global batch."""
    lengths = torch.cat([p[0] for p in parts], dim=1)
    values = []
    for f in range(lengths.shape[0]):
        for lens, vals in parts:
            offs = [0, *torch.cumsum(lens.sum(1), 0).tolist()]
            values.append(vals[offs[f] : offs[f + 1]])
    return lengths, torch.cat(values)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_trainers_sync_equals_one_tbe_on_global_batch(shard_factory, layout):
    tables, features, table_map = LAYOUTS[layout]
    config = {"seed": 5, "mode": "sync", "num_trainers": 2, "tables": tables}
    _, c0 = shard_factory(config)
    c1 = type(c0)(c0.address)
    clients = [c0, c1]
    ref = InProcessTBE(config) if layout == "one_feature_per_table" else TorchReference(config, table_map)
    rows = [tables[t]["num_rows"] for t in table_map]
    gen = torch.Generator().manual_seed(2)
    sizes = [6, 10]  # trainers may differ in batch size
    for step in range(5):
        parts = [batch(gen, b, rows) for b in sizes]
        grads = [torch.randn(b, 8 * len(features), generator=gen) for b in sizes]
        results: dict[int, object] = {}

        def trainer(i: int, step=step, parts=parts, grads=grads, results=results) -> None:
            lens, vals = parts[i]
            res = clients[i].lookup(features, sizes[i], lens.flatten(), vals, trainer_id=i, step=step)
            upd = clients[i].update(res.handle, grads[i])
            results[i] = (res, upd)

        threads = [threading.Thread(target=trainer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(results) == {0, 1}
        lengths, values = global_batch(parts)
        out = ref.step(lengths, values, torch.cat(grads))
        torch.testing.assert_close(results[0][0].embeddings, out[: sizes[0]], atol=1e-6, rtol=0)
        torch.testing.assert_close(results[1][0].embeddings, out[sizes[0] :], atol=1e-6, rtol=0)
        assert results[0][1].merged_trainers == 2 and results[1][1].applied_step == step
    for i, (t, w) in enumerate(zip(tables, ref.weights(), strict=True)):
        got = c0.lookup_rows(f"t{i}", torch.arange(t["num_rows"]))
        torch.testing.assert_close(got, w, atol=1e-6, rtol=0)
    c1.close()


def test_sync_orders_steps_and_rejects_replays(shard_factory):
    config = {"seed": 5, "mode": "sync", "num_trainers": 1, "wait_timeout_s": 1.0, "tables": TABLES}
    _, c = shard_factory(config)
    gen = torch.Generator().manual_seed(4)
    lens, vals = batch(gen, 4)
    first = c.lookup(FEATURES, 4, lens.flatten(), vals, step=0)
    # step 1 must wait for step 0's update: with no update it times out, naming the step
    with pytest.raises(grpc.RpcError) as e:
        c.lookup(FEATURES, 4, lens.flatten(), vals, step=1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "step 0" in e.value.details()
    pending = c.lookup_async(FEATURES, 4, lens.flatten(), vals, step=1)  # served once step 0 is applied
    c.update(first.handle, torch.ones(4, 24))
    second = pending.result(30)
    assert second.handle.startswith("t0-s1")
    with pytest.raises(grpc.RpcError) as e:
        c.update(first.handle, torch.ones(4, 24))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    c.update(second.handle, torch.ones(4, 24))
    with pytest.raises(grpc.RpcError) as e:
        c.lookup(FEATURES, 4, lens.flatten(), vals, step=1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already applied" in e.value.details()


def test_async_mode_applies_each_update_with_bounded_staleness(shard_factory):
    config = {"seed": 5, "mode": "async", "num_trainers": 2, "staleness": 1, "wait_timeout_s": 1.0,
              "tables": TABLES}
    _, c = shard_factory(config)
    gen = torch.Generator().manual_seed(8)
    lens, vals = batch(gen, 4)
    before = c.lookup(FEATURES, 4, lens.flatten(), vals, no_grad=True).embeddings
    h0 = c.lookup(FEATURES, 4, lens.flatten(), vals, trainer_id=0, step=0)
    h1 = c.lookup(FEATURES, 4, lens.flatten(), vals, trainer_id=0, step=1)  # staleness 1: allowed
    with pytest.raises(grpc.RpcError) as e:  # step 2 would be 2 ahead of the unapplied step 0
        c.lookup(FEATURES, 4, lens.flatten(), vals, trainer_id=0, step=2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    other = c.lookup(FEATURES, 4, lens.flatten(), vals, trainer_id=1, step=0)  # other trainers unaffected
    assert c.update(h0.handle, torch.ones(4, 24)).merged_trainers == 1  # applied alone, at once
    after = c.lookup(FEATURES, 4, lens.flatten(), vals, no_grad=True).embeddings
    assert not torch.equal(before, after)
    c.update(h1.handle, torch.ones(4, 24))
    c.update(other.handle, torch.ones(4, 24))
    assert c.info().updates == 3


def test_restore_fails_parked_lookups_so_they_cannot_install_a_step(shard_factory):
    """A killed trainer's lookup stays parked in the shard (the server runs its handler to the end). A Restore
    must fail it (ABORTED, naming the restore): before, it woke at the reset and installed its own later
    step, so the restored job's first lookup waited on a step nobody would finish (DEADLINE_EXCEEDED)."""
    config = {"seed": 5, "mode": "sync", "num_trainers": 2, "wait_timeout_s": 20.0, "tables": TABLES}
    _, c = shard_factory(config)
    gen = torch.Generator().manual_seed(4)
    lens, vals = batch(gen, 4)
    c.checkpoint("ck", step=3)
    collecting = c.lookup_async(FEATURES, 4, lens.flatten(), vals, trainer_id=0, step=0)  # waits for trainer 1
    later = c.lookup_async(FEATURES, 4, lens.flatten(), vals, trainer_id=1, step=7)  # waits for step 0
    time.sleep(1.0)
    assert not collecting.done() and not later.done()
    assert c.restore("ck").step == 3
    for parked in (collecting, later):
        with pytest.raises(grpc.RpcError) as e:
            parked.result(30)
        assert e.value.code() == grpc.StatusCode.ABORTED, (e.value.code(), e.value.details())
    assert "restored" in e.value.details() and "step 7" in e.value.details(), e.value.details()
    # the resumed job's step 4 runs at once: no stale step 7 sits in the queue
    t0 = time.monotonic()
    pending = c.lookup_async(FEATURES, 4, lens.flatten(), vals, trainer_id=0, step=4)
    mine = c.lookup(FEATURES, 4, lens.flatten(), vals, trainer_id=1, step=4)
    theirs = pending.result(30)
    assert time.monotonic() - t0 < 10.0  # before the fix: the 20 s wait timeout, then DEADLINE_EXCEEDED
    other_update = c.update_async(theirs.handle, torch.ones(4, 24))
    assert c.update(mine.handle, torch.ones(4, 24)).applied_step == 4
    assert other_update.result(30).applied_step == 4
