"""On synthetic teacher data, training through the shards reaches the teacher's held-out AUC."""

from __future__ import annotations

import torch

from embedding_service.process import launch
from tests.test_trainer_pipeline import MODEL, PLAN, shard_config
from trainer.data import HELDOUT, SyntheticData, auc
from trainer.train import ShardedTrainer


def test_heldout_auc_within_001_of_teacher(tmp_path):
    shards = [launch(shard_config(s), workdir=tmp_path / f"s{s}") for s in range(2)]
    try:
        trainer = ShardedTrainer(MODEL, PLAN, [s.address for s in shards], seed=1)
        data = SyntheticData(MODEL, seed=1)
        losses = [r.loss for r in trainer.train(data.batches(512, 1500))]
        scores, labels = [], []
        for b in data.batches(2048, 4, stream=HELDOUT):  # never trained on
            scores.append(trainer.predict(b, 0))
            labels.append(b.labels)
        trainer.close()
    finally:
        for s in shards:
            s.kill()
    model_auc = auc(torch.cat(scores), torch.cat(labels))
    teacher = data.teacher_auc(8192)
    assert sum(losses[-100:]) / 100 < sum(losses[:100]) / 100
    assert model_auc > teacher - 0.01, (model_auc, teacher)
