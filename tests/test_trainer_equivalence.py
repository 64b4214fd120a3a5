"""Sync training with 2 trainers x 2 shards (table-, row-, column- and table-row-wise) equals one
process training the same dense model on the global batch with one in-process TBE."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from embedding_service.process import launch
from embedding_service.tables import ShardTables
from protos import codec, common_pb2
from protos.model_config import ModelConfig
from protos.plan import assignment, assignment_from_dict, dump_plan, shard_config, simple_plan
from protos.process import free_port
from protos.shard_client import ShardClient
from trainer.data import SyntheticData
from trainer.model import DenseDLRM

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny.yaml"
STEPS, BATCH, SEED = 20, 32, 3


def reference(model_cfg: ModelConfig, steps: int = STEPS, batch_size: int = BATCH):
    """One process, global batch: every table whole in one in-process TBE set, the same dense model."""
    tables = ShardTables(assignment_from_dict({"tables": [
        {"name": t.name, "num_rows": t.num_rows, "dim": t.dim, "features": list(t.features),
         "optimizer": {"type": common_pb2.OptimizerType.Name(t.optimizer.type).lower(),
                       "learning_rate": t.optimizer.learning_rate}} for t in model_cfg.tables]}), seed=SEED)
    model = DenseDLRM(model_cfg, seed=SEED)
    opt = torch.optim.SGD(model.parameters(), lr=model_cfg.dense_lr)
    feats = [(f.name, None) for f in model_cfg.features]
    for batch in SyntheticData(model_cfg, seed=SEED).batches(batch_size, steps):
        sp = batch.sparse
        prepared = tables.prepare(feats, batch_size, sp.lengths, sp.values, sp.weights)
        fwd = tables.forward([prepared], requires_grad=True)
        emb = fwd.embeddings[0].detach().requires_grad_()
        loss = F.binary_cross_entropy_with_logits(model(batch.dense, emb), batch.labels)
        opt.zero_grad()
        loss.backward()
        tables.backward(fwd, [emb.grad])
        opt.step()
    return tables, model


MODEL = ModelConfig.load(CONFIG)
PLAN = simple_plan(MODEL, 2, kinds={"users": common_pb2.ROW_WISE, "items": common_pb2.COLUMN_WISE,
                                    "cities": common_pb2.TABLE_ROW_WISE, "hours": common_pb2.DATA_PARALLEL})


def start_shards(tmp_path: Path, name: str, collective_port: int | None = None) -> list:
    """Two shard processes; with `collective_port` they also join the job's group as ranks 2 and 3."""
    shards = []
    for s in range(2):
        cfg = shard_config(PLAN, s, num_trainers=2, seed=SEED, collective=collective_port is not None)
        env = None
        if collective_port is not None:
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(collective_port))
        shards.append(launch(cfg, workdir=tmp_path / f"{name}{s}", env=env))
    return shards


def run_trainers(tmp_path: Path, shards: list, *extra: str, port: int | None = None) -> None:
    """Two trainer processes (torchrun-style env, gloo), to completion."""
    (tmp_path / "plan.json").write_text(dump_plan(PLAN))
    port = port or free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "train", "--config", str(CONFIG), "--plan",
             str(tmp_path / "plan.json"), "--shards", ",".join(s.address for s in shards),
             "--batch-size", str(BATCH), "--seed", str(SEED), "--out", str(tmp_path / "out"), "--json", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


@pytest.mark.parametrize("transport, pipeline", [("grpc", True), ("collective", True), ("collective", False)])
def test_two_trainers_two_shards_equal_single_process(tmp_path, transport, pipeline):
    model_cfg, plan = MODEL, PLAN
    port = free_port() if transport == "collective" else None
    shards = start_shards(tmp_path, "shard", collective_port=port)
    try:
        flags = ["--steps", str(STEPS), "--transport", transport, *([] if pipeline else ["--no-pipeline"])]
        run_trainers(tmp_path, shards, *flags, port=port)
        for s in shards:
            with ShardClient(s.address, plan_version=plan.version) as client:
                info = client.info()
            assert info.applied_step == STEPS - 1
            if transport == "collective":  # every step went through all-to-all, none through Lookup RPCs
                assert info.lookups == 0 and f"trainers stopped after {STEPS} steps" in s.log_tail()
            else:
                assert info.lookups == 2 * STEPS
        ref_tables, ref_model = reference(model_cfg)

        dense = torch.load(tmp_path / "out" / "dense.pt")
        for name, value in ref_model.state_dict().items():
            torch.testing.assert_close(dense[name], value, atol=1e-5, rtol=0, msg=name)
        # the data-parallel table, replicated in the trainers, trained as the in-process TBE trained it
        local = torch.load(tmp_path / "out" / "local.pt")
        hours = next(r for r in ref_tables.slices if r.slice.table == "hours").weights.detach()
        torch.testing.assert_close(local["bags.hours.weight"], hours, atol=1e-5, rtol=0)
        # every slice of every shard equals the same rows and columns of the reference tables
        for s, proc in enumerate(shards):
            with ShardClient(proc.address, plan_version=plan.version) as client:
                for idx, sl in enumerate(assignment(plan, s).slices):
                    ref = next(r for r in ref_tables.slices if r.slice.table == sl.table)
                    w, states = [], []
                    for chunk in client.export_rows(idx, 0, sl.num_rows):
                        w.append(codec.decode(chunk.weights).clone())
                        states.append([codec.decode(x).clone() for x in chunk.optimizer_state])
                    rows = slice(sl.row_offset, sl.row_offset + sl.num_rows)
                    cols = slice(sl.col_offset, sl.col_offset + sl.num_cols)
                    torch.testing.assert_close(torch.cat(w), ref.weights.detach()[rows, cols], atol=1e-5, rtol=0,
                                               msg=f"{sl.table} weights")
                    for k, live in enumerate(ref.states):
                        got = torch.cat([st[k] for st in states])
                        want = live.detach()[rows] if live.dim() == 1 else live.detach()[rows, cols]
                        torch.testing.assert_close(got.view(want.shape), want, atol=1e-5, rtol=0,
                                                   msg=f"{sl.table} state")
        assert not torch.equal(ref_tables.slices[0].weights, ShardTables(
            assignment_from_dict({"tables": [{"name": "users", "num_rows": 200, "dim": 8, "features": ["user"]}]}),
            seed=SEED).slices[0].weights)  # training moved the weights
    finally:
        for s in shards:
            s.kill()


def test_checkpoint_kill_and_resume_equals_uninterrupted(tmp_path):
    """Stop after 12 steps (checkpoints every 6), kill -9 the shards, resume on new ones to step 20."""
    ckpt = str(tmp_path / "ckpt")
    shards = start_shards(tmp_path, "first")
    try:
        run_trainers(tmp_path, shards, "--steps", "12", "--checkpoint-dir", ckpt, "--checkpoint-every", "6")
    finally:
        for s in shards:
            s.kill()
    assert (tmp_path / "ckpt" / "LATEST").read_text() == "step-11"
    shards = start_shards(tmp_path, "resumed")
    try:
        run_trainers(tmp_path, shards, "--steps", str(STEPS), "--checkpoint-dir", ckpt, "--resume")
        ref_tables, ref_model = reference(MODEL)
        dense = torch.load(tmp_path / "out" / "dense.pt")
        for name, value in ref_model.state_dict().items():
            torch.testing.assert_close(dense[name], value, atol=1e-5, rtol=0, msg=name)
        with ShardClient(shards[0].address, plan_version=PLAN.version) as client:
            sl = assignment(PLAN, 0).slices[0]
            assert client.info().applied_step == STEPS - 1
            got = client.lookup_rows(sl.table, torch.arange(sl.num_rows), slice=0)
        ref = next(r for r in ref_tables.slices if r.slice.table == sl.table).weights.detach()
        torch.testing.assert_close(got, ref[sl.row_offset : sl.row_offset + sl.num_rows,
                                             sl.col_offset : sl.col_offset + sl.num_cols], atol=1e-5, rtol=0)
    finally:
        for s in shards:
            s.kill()
