"""Checkpoint / Restore across a kill -9, corrupt checkpoints, and row export/import between shards."""

from __future__ import annotations

import json
import os
import signal

import grpc
import pytest
import torch

from protos import codec
from protos.shard_client import migrate_rows

TABLES = [
    {"name": "big", "num_rows": 300, "dim": 16, "features": ["u"],
     "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.1}},
    {"name": "small", "num_rows": 20, "dim": 8, "features": ["v"],
     "optimizer": {"type": "exact_adagrad", "learning_rate": 0.1}},
]


def train(client, steps: int, seed: int = 0, rows=(300, 20), features=("u", "v"), start_step: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in range(start_step, start_step + steps):
        lengths = torch.randint(1, 4, (len(features), 8), generator=gen)
        values = torch.cat([torch.randint(0, r, (int(n),), generator=gen)
                            for r, n in zip(rows, lengths.sum(1), strict=True)])
        res = client.lookup(list(features), 8, lengths.flatten(), values, step=step)
        client.update(res.handle, torch.randn(res.embeddings.shape, generator=gen))


def snapshot(client) -> dict[str, torch.Tensor]:
    return {t["name"]: client.lookup_rows(t["name"], torch.arange(t["num_rows"])) for t in TABLES}


def exported(client, slice_index: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    w, s = [], []
    for chunk in client.export_rows(slice_index, start, end):
        w.append(codec.decode(chunk.weights).clone())
        s.append(codec.decode(chunk.optimizer_state[0]).clone())
    return torch.cat(w), torch.cat(s)


def test_checkpoint_survives_kill9_and_restores_identically(shard_factory, tmp_path):
    config = {"seed": 1, "tables": TABLES}
    proc, client = shard_factory(config)
    train(client, 5)
    before = snapshot(client)
    state_before = exported(client, 0, 0, 300)
    ckpt = tmp_path / "ckpt"
    resp = client.checkpoint(str(ckpt), step=4)
    assert resp.bytes_written > 300 * 16 * 4
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 4 and len(manifest["slices"]) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.proc.wait(10)

    _, fresh = shard_factory(config)
    assert not torch.equal(snapshot(fresh)["big"], before["big"])  # a new process starts from init
    assert fresh.restore(str(ckpt)).step == 4
    after = snapshot(fresh)
    for name in before:
        assert torch.equal(after[name], before[name])
    w, s = exported(fresh, 0, 0, 300)
    assert torch.equal(w, state_before[0]) and torch.equal(s, state_before[1])
    # training continues from the restored step; an older step is refused
    with pytest.raises(grpc.RpcError) as e:
        train(fresh, 1, start_step=4)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    train(fresh, 1, start_step=5)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corrupt_checkpoint_is_refused_and_live_weights_stay(shard_factory, tmp_path, damage):
    config = {"seed": 1, "tables": TABLES}
    _, client = shard_factory(config)
    ckpt = tmp_path / "ckpt"
    client.checkpoint(str(ckpt), step=0)
    train(client, 2)
    live = snapshot(client)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    target = ckpt / manifest["slices"][0]["files"][0]["name"]
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[100] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-16])
    elif damage == "delete":
        target.unlink()
    else:
        (ckpt / "manifest.json").write_text("{not json")
    with pytest.raises(grpc.RpcError) as e:
        client.restore(str(ckpt))
    assert e.value.code() == grpc.StatusCode.DATA_LOSS
    if damage != "manifest":
        assert target.name in e.value.details() and "big" in e.value.details()
    after = snapshot(client)
    for name in live:
        assert torch.equal(after[name], live[name])
    train(client, 1, start_step=2)  # still serving


def test_checkpoint_rewrite_keeps_only_current_files(shard_factory, tmp_path):
    _, client = shard_factory({"seed": 1, "tables": TABLES})
    ckpt = tmp_path / "ckpt"
    client.checkpoint(str(ckpt), step=0)
    train(client, 1)
    client.checkpoint(str(ckpt), step=1)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    named = {f["name"] for s in manifest["slices"] for f in s["files"]}
    on_disk = {p.name for p in ckpt.iterdir() if p.name != "manifest.json"}
    assert on_disk == named and all(n.startswith("1-") for n in named)


def test_export_import_moves_rows_and_optimizer_state(shard_factory):
    src_cfg = {"seed": 1, "plan_version": 1, "tables": TABLES}
    _, src = shard_factory(src_cfg, name="src")
    # the destination holds rows [100, 300) of `big` as its slice 0
    dst_cfg = {"seed": 1, "plan_version": 2, "tables": TABLES, "slices": [
        {"table": "big", "row_offset": 100, "num_rows": 200, "col_offset": 0, "num_cols": 16,
         "sharding_type": "row_wise"}]}
    _, dst = shard_factory(dst_cfg, name="dst")
    train(src, 4)
    ids = torch.arange(100, 300)
    src_rows = src.lookup_rows("big", ids)
    assert not torch.equal(dst.lookup_rows("big", ids - 100), src_rows)
    resp = migrate_rows(src, dst, src_slice=0, row_start=100, row_end=300, dst_slice=0, dst_row_start=0,
                        chunk_rows=64)
    assert resp.rows == 200 and resp.chunks == 4
    assert torch.equal(dst.lookup_rows("big", ids - 100), src_rows)
    w_src, s_src = exported(src, 0, 100, 300)
    w_dst, s_dst = exported(dst, 0, 0, 200)
    assert torch.equal(w_src, w_dst) and torch.equal(s_src, s_dst) and s_src.abs().sum() > 0
    # pooled lookups agree, and the same update keeps them equal (the state really moved)
    gen = torch.Generator().manual_seed(9)
    local = torch.randint(0, 200, (12,), generator=gen)
    lengths = torch.full((6,), 2)
    a = src.lookup(["u"], 6, lengths, local + 100, step=100)
    b = dst.lookup(["u"], 6, lengths, local, step=0)
    assert torch.equal(a.embeddings, b.embeddings)
    g = torch.randn(6, 16, generator=gen)
    src.update(a.handle, g)
    dst.update(b.handle, g)
    assert torch.equal(src.lookup_rows("big", ids), dst.lookup_rows("big", ids - 100))


def test_import_refuses_bad_chunks_and_changes_nothing(shard_factory):
    _, src = shard_factory({"seed": 1, "tables": TABLES}, name="src")
    _, dst = shard_factory({"seed": 2, "tables": TABLES}, name="dst")
    before = snapshot(dst)
    chunks = list(src.export_rows(0, 0, 300, chunk_rows=100))
    bad = list(chunks)
    bad[2].sha256 = b"\0" * 32  # the last chunk is corrupt: the first two must not be applied either
    with pytest.raises(grpc.RpcError) as e:
        dst.import_rows(bad)
    assert e.value.code() == grpc.StatusCode.DATA_LOSS and "chunk 2" in e.value.details()
    wrong = list(src.export_rows(1, 0, 20))  # adagrad state [n, 8] into a row-wise table
    for c in wrong:
        c.slice = 0
        c.table = "big"
    with pytest.raises(grpc.RpcError) as e:
        dst.import_rows(wrong)
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    with pytest.raises(grpc.RpcError) as e:
        list(src.export_rows(0, 250, 400))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "big" in e.value.details()
    after = snapshot(dst)
    for name in before:
        assert torch.equal(after[name], before[name])
