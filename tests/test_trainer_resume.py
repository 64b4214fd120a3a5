"""A job checkpointed at step k and resumed on fresh shard processes ends where an uninterrupted run
ends; a corrupted checkpoint is refused before anything is restored."""

from __future__ import annotations

import pytest
import torch

from embedding_service.process import launch
from protos.plan import assignment
from protos.shard_client import ShardClient
from tests.test_trainer_pipeline import MODEL, PLAN, shard_config
from trainer import checkpoint
from trainer.data import SyntheticData
from trainer.train import ShardedTrainer

STEPS, CUT, BATCH = 16, 7, 16


def start(tmp_path, name):
    shards = [launch(shard_config(s), workdir=tmp_path / f"{name}{s}") for s in range(2)]
    return shards, ShardedTrainer(MODEL, PLAN, [s.address for s in shards], seed=1)


def final_state(trainer, shards):
    tables = []
    for shard, s in enumerate(shards):
        with ShardClient(s.address, plan_version=PLAN.version) as c:
            tables += [c.lookup_rows(sl.table, torch.arange(sl.num_rows), slice=i)
                       for i, sl in enumerate(assignment(PLAN, shard).slices)]
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}, tables


def test_resume_equals_uninterrupted(tmp_path):
    data = SyntheticData(MODEL, seed=1)
    shards, trainer = start(tmp_path, "straight")
    try:
        list(trainer.train(data.batches(BATCH, STEPS)))
        want_dense, want_tables = final_state(trainer, shards)
    finally:
        for s in shards:
            s.kill()

    shards, trainer = start(tmp_path, "first")
    try:
        last = list(trainer.train(data.batches(BATCH, CUT + 1)))[-1]
        trainer.wait_updates()
        path = checkpoint.save(trainer, tmp_path / "ckpt", step=last.step, data_position=last.step + 1)
    finally:
        for s in shards:
            s.kill()  # kill -9: only the checkpoint survives
    assert checkpoint.latest(tmp_path / "ckpt") == path

    shards, trainer = start(tmp_path, "resumed")
    try:
        resumed = checkpoint.restore(trainer, checkpoint.latest(tmp_path / "ckpt"))
        assert (resumed.step, resumed.data_position) == (CUT, CUT + 1)
        rest = data.batches(BATCH, STEPS - resumed.data_position, start=resumed.data_position)
        list(trainer.train(rest, first_step=resumed.step + 1))
        got_dense, got_tables = final_state(trainer, shards)
    finally:
        for s in shards:
            s.kill()
    for k in want_dense:
        torch.testing.assert_close(got_dense[k], want_dense[k], atol=1e-6, rtol=0, msg=k)
    for a, b in zip(got_tables, want_tables, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_corrupt_job_checkpoint_is_refused(tmp_path):
    shards, trainer = start(tmp_path, "c")
    try:
        list(trainer.train(SyntheticData(MODEL, seed=1).batches(BATCH, 2)))
        trainer.wait_updates()
        path = checkpoint.save(trainer, tmp_path / "ckpt", step=1, data_position=2)
        before = final_state(trainer, shards)
        dense = path / "dense.pt"
        dense.write_bytes(dense.read_bytes()[:-10])
        with pytest.raises(checkpoint.CheckpointError, match=r"dense\.pt: sha256 mismatch"):
            checkpoint.restore(trainer, path)
        after = final_state(trainer, shards)
        assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    finally:
        for s in shards:
            s.kill()
    with pytest.raises(checkpoint.CheckpointError, match="no LATEST"):
        checkpoint.latest(tmp_path / "nothing")
