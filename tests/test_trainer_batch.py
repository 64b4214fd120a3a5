"""Jagged batches, the synthetic teacher data, and the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protos.model_config import ModelConfig
from trainer.batch import SparseBatch
from trainer.data import SyntheticData, auc, normalized_entropy

MODEL = ModelConfig.load(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")


def test_split_and_concat_are_inverse():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 4, (3 * 7,), generator=gen)
    values = torch.arange(int(lengths.sum()))
    sb = SparseBatch(["a", "b", "c"], lengths, values, values.float() / 10)
    parts = sb.split([2, 0, 5])
    assert [p.batch_size for p in parts] == [2, 0, 5]
    # trainer 0 gets bags 0-1 of every feature, in feature order
    l2 = lengths.view(3, 7)
    starts = [0, *torch.cumsum(lengths, 0).tolist()]
    want = torch.cat([values[starts[f * 7] : starts[f * 7 + 2]] for f in range(3)])
    assert torch.equal(parts[0].values, want) and torch.equal(parts[0].lengths, l2[:, :2].flatten())
    back = SparseBatch.concat(parts)
    assert torch.equal(back.lengths, lengths) and torch.equal(back.values, values)
    assert torch.equal(back.weights, sb.weights)
    lens, vals, _ = sb.feature("b")
    assert torch.equal(lens, l2[1]) and torch.equal(vals, values[starts[7] : starts[14]])


def test_sparse_batch_validation_names_the_field():
    with pytest.raises(ValueError, match="lengths add up to 3"):
        SparseBatch(["a"], torch.tensor([1, 2]), torch.arange(4))
    with pytest.raises(ValueError, match="lengths: 3 entries"):
        SparseBatch(["a", "b"], torch.tensor([1, 1, 1]), torch.arange(3))
    with pytest.raises(ValueError, match="weights"):
        SparseBatch(["a"], torch.tensor([2]), torch.arange(2), torch.ones(3))
    with pytest.raises(ValueError, match="sizes"):
        SparseBatch(["a"], torch.tensor([2]), torch.arange(2)).split([2])


def test_synthetic_batches_are_deterministic_skewed_and_in_range():
    data = SyntheticData(MODEL, seed=4)
    a = list(data.batches(64, 3))
    b = list(data.batches(64, 2, start=1))
    assert torch.equal(a[1].sparse.values, b[0].sparse.values) and torch.equal(a[2].labels, b[1].labels)
    assert not torch.equal(a[0].dense, a[1].dense)
    big = data.batch(0, 4096)
    for f in MODEL.features:
        _, ids, _ = big.sparse.feature(f.name)
        assert int(ids.min()) >= 0 and int(ids.max()) < f.num_rows
    _, ids, _ = big.sparse.feature("item")
    top = torch.bincount(ids, minlength=500).sort(descending=True).values
    assert top[:5].sum() > 0.25 * ids.numel()  # Zipf: the 1% hottest ids carry a large share
    assert 0.15 < float(big.labels.mean()) < 0.6


def test_auc_matches_pairwise_definition_with_ties():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (60,), generator=gen).float()
    labels = torch.randint(0, 2, (60,), generator=gen).float()
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert auc(scores, labels) == pytest.approx(float(pairwise), abs=1e-12)
    with pytest.raises(ValueError):
        auc(torch.rand(4), torch.ones(4))


def test_teacher_auc_and_normalized_entropy():
    data = SyntheticData(MODEL, seed=0)
    teacher = data.teacher_auc(8192)
    assert 0.7 < teacher < 0.95
    b = data.batch(0, 8192, stream=1)
    base = torch.full((8192,), float(b.labels.mean()))
    assert normalized_entropy(base, b.labels) == pytest.approx(1.0, abs=1e-6)
    assert normalized_entropy(data.probabilities(b.dense, b.sparse), b.labels) < 0.95
