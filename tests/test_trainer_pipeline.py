"""The pipelined loop gives exactly the non-pipelined results; unreachable shards fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embedding_service.process import launch
from protos import common_pb2
from protos.model_config import ModelConfig
from protos.plan import assignment, simple_plan
from protos.plan import shard_config as plan_shard_config
from protos.shard_client import ShardClient
from trainer.data import SyntheticData
from trainer.train import ShardedTrainer
from trainer.transport import GrpcTransport, ShardUnavailable

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig.load(ROOT / "configs" / "tiny.yaml")
PLAN = simple_plan(MODEL, 2, kinds={"users": common_pb2.ROW_WISE, "items": common_pb2.COLUMN_WISE})


def shard_config(shard: int) -> dict:
    return plan_shard_config(PLAN, shard, seed=1)


def run(tmp_path: Path, name: str, pipelined: bool) -> tuple[dict, list[torch.Tensor], list[float]]:
    shards = [launch(shard_config(s), workdir=tmp_path / f"{name}{s}") for s in range(2)]
    try:
        trainer = ShardedTrainer(MODEL, PLAN, [s.address for s in shards], seed=1)
        losses = [r.loss for r in trainer.train(SyntheticData(MODEL, seed=1).batches(16, 12), pipelined=pipelined)]
        trainer.close()
        tables = []
        for shard, s in enumerate(shards):
            with ShardClient(s.address, plan_version=PLAN.version) as c:
                for idx, sl in enumerate(assignment(PLAN, shard).slices):
                    tables.append(c.lookup_rows(sl.table, torch.arange(sl.num_rows), slice=idx))
        return trainer.model.state_dict(), tables, losses
    finally:
        for s in shards:
            s.kill()


def test_pipelined_equals_non_pipelined(tmp_path):
    dense_a, tables_a, losses_a = run(tmp_path, "piped", pipelined=True)
    dense_b, tables_b, losses_b = run(tmp_path, "plain", pipelined=False)
    assert losses_a == losses_b and len(losses_a) == 12
    for k in dense_a:
        assert torch.equal(dense_a[k], dense_b[k]), k
    for a, b in zip(tables_a, tables_b, strict=True):
        assert torch.equal(a, b)
    assert losses_a[-1] != losses_a[0]


def test_unreachable_shard_names_shard_and_plan_version():
    transport = GrpcTransport(["127.0.0.1:1"], plan_version=7, retries=2, backoff_s=0.05, timeout_s=5)
    trainer_requests = {0: type("R", (), {"features": [("user", 0)], "lengths": torch.tensor([1]),
                                          "values": torch.tensor([0]), "weights": None})()}
    with pytest.raises(ShardUnavailable, match=r"shard 0 at 127\.0\.0\.1:1 unavailable .* \(plan version 7\)"):
        transport.lookup(trainer_requests, step=0)
    transport.close()


def test_plan_and_shard_count_must_match():
    with pytest.raises(ValueError, match=r"plan .* has 2 shards, got 1"):
        ShardedTrainer(MODEL, PLAN, ["127.0.0.1:1"])


def test_bounded_staleness_runs_ahead_and_trains(tmp_path):
    shards = [launch(plan_shard_config(PLAN, s, seed=1, mode="async", staleness=2), workdir=tmp_path / f"a{s}")
              for s in range(2)]
    sync = [launch(plan_shard_config(PLAN, s, seed=1), workdir=tmp_path / f"s{s}") for s in range(2)]
    try:
        trainer = ShardedTrainer(MODEL, PLAN, [s.address for s in shards], seed=1)
        seen = []
        for r in trainer.train(SyntheticData(MODEL, seed=1).batches(64, 40), staleness=2):
            seen.append(len(trainer._inflight))
            last = r
        assert max(seen) == 3  # at each yield: this step's updates and the 2 before it were still in flight
        assert last.step == 39 and not trainer._inflight
        for s in shards:
            with ShardClient(s.address, plan_version=PLAN.version) as c:
                assert c.info().updates == 40
        trainer.close()
        with pytest.raises(ValueError, match=r"shard 0 .* runs sync mode"):
            next(ShardedTrainer(MODEL, PLAN, [s.address for s in sync], seed=1).train(
                SyntheticData(MODEL, seed=1).batches(64, 1), staleness=1))
    finally:
        for s in shards + sync:
            s.kill()
