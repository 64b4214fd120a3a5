"""The data layer beyond tests/test_trainer_batch.py and tests/test_criteo_reader.py: uneven splits with int32
ids, synthetic data identical across processes (every trainer builds its own generator), pooling, AUC/NE edge
cases, and the Criteo reader with fewer features than columns, several files, logging and resumption."""

from __future__ import annotations

import itertools
import logging
import math
import random
from pathlib import Path

import pytest
import torch

from protos.model_config import ModelConfig
from trainer.batch import Batch, SparseBatch
from trainer.criteo import CriteoReader
from trainer.data import HELDOUT, SyntheticData, auc, normalized_entropy

TINY = ModelConfig.load(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")


def random_sparse(num_keys: int, batch: int, seed: int, weighted: bool) -> SparseBatch:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (num_keys * batch,), generator=gen, dtype=torch.int32)
    values = torch.randint(0, 1000, (int(lengths.sum()),), generator=gen, dtype=torch.int32)
    weights = torch.rand(values.shape, generator=gen) if weighted else None
    return SparseBatch([f"k{i}" for i in range(num_keys)], lengths, values, weights)


def bags(sb: SparseBatch) -> list[list[list[int]]]:
    """Reference view: bags[f][b] = ids of sample b's bag of feature f, built one bag at a time."""
    out, pos = [], 0
    lengths = sb.lengths.tolist()
    for f in range(len(sb.keys)):
        row = []
        for b in range(sb.batch_size):
            n = lengths[f * sb.batch_size + b]
            row.append(sb.values[pos : pos + n].tolist())
            pos += n
        out.append(row)
    return out


@pytest.mark.parametrize("weighted", [False, True])
def test_uneven_split_gives_every_trainer_its_samples_of_every_feature(weighted):
    sb = random_sparse(num_keys=3, batch=10, seed=7, weighted=weighted)
    sizes = [3, 1, 4, 0, 2]
    parts = sb.split(sizes)
    ref = bags(sb)
    start = 0
    for part, n in zip(parts, sizes, strict=True):
        assert part.keys == sb.keys and part.batch_size == n
        assert part.lengths.dtype == torch.int32 and part.values.dtype == torch.int32
        assert bags(part) == [row[start : start + n] for row in ref]
        assert (part.weights is None) == (not weighted)
        start += n
    back = SparseBatch.concat(parts)
    assert torch.equal(back.lengths, sb.lengths) and torch.equal(back.values, sb.values)
    if weighted:
        assert torch.equal(back.weights, sb.weights)
    with pytest.raises(ValueError, match="sizes"):
        sb.split([5, 4])


def test_offsets_feature_and_batch_split():
    sb = random_sparse(num_keys=4, batch=6, seed=3, weighted=True)
    per_feature = sb.lengths.view(4, 6).sum(1).tolist()
    offs = sb.offsets()
    assert offs[0] == 0 and offs[-1] == sb.values.numel()
    assert [b - a for a, b in itertools.pairwise(offs)] == per_feature
    lens, vals, w = sb.feature("k2")
    assert torch.equal(lens, sb.lengths.view(4, 6)[2])
    assert torch.equal(vals, sb.values[offs[2] : offs[3]]) and torch.equal(w, sb.weights[offs[2] : offs[3]])
    with pytest.raises(ValueError):
        sb.feature("missing")

    dense = torch.arange(6 * 2, dtype=torch.float32).view(6, 2)
    batch = Batch(dense, sb, torch.tensor([0.0, 1, 1, 0, 1, 0]))
    parts = batch.split([4, 2])
    assert [p.batch_size for p in parts] == [4, 2]
    assert torch.equal(parts[1].dense, dense[4:]) and torch.equal(parts[1].labels, batch.labels[4:])
    assert bags(parts[1].sparse) == [row[4:] for row in bags(sb)]


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="keys"):
        SparseBatch([], torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="values"):
        SparseBatch(["a", "b"], torch.tensor([1, 2]), torch.arange(2))
    with pytest.raises(ValueError, match="lengths"):
        SparseBatch(["a", "b", "c"], torch.tensor([1, 1]), torch.arange(2))
    with pytest.raises(ValueError, match="weights"):
        SparseBatch(["a"], torch.tensor([3]), torch.arange(3), torch.ones(2))


def test_synthetic_batches_are_the_same_in_every_process_and_differ_by_seed_and_stream():
    a, b = SyntheticData(TINY, seed=11), SyntheticData(TINY, seed=11)
    x = list(a.batches(32, 4))
    y = list(b.batches(32, 2, start=2))  # another trainer, resumed at batch 2
    for u, v in zip(x[2:], y, strict=True):
        assert torch.equal(u.dense, v.dense) and torch.equal(u.labels, v.labels)
        assert torch.equal(u.sparse.lengths, v.sparse.lengths) and torch.equal(u.sparse.values, v.sparse.values)
    other_seed = SyntheticData(TINY, seed=12).batch(0, 32)
    heldout = a.batch(0, 32, stream=HELDOUT)
    assert not torch.equal(other_seed.dense, x[0].dense) and not torch.equal(heldout.dense, x[0].dense)
    assert x[0].dense.shape == (32, TINY.dense_features) and x[0].dense.dtype == torch.float32
    assert x[0].sparse.keys == [f.name for f in TINY.features]


def test_ids_in_range_zipf_skewed_and_hot_ids_permuted():
    data = SyntheticData(TINY, seed=2)
    big = data.batch(0, 8192)
    for f in TINY.features:
        lens, ids, _ = big.sparse.feature(f.name)
        assert bool((lens == 1).all())
        assert int(ids.min()) >= 0 and int(ids.max()) < f.num_rows
        counts = torch.bincount(ids, minlength=f.num_rows).sort(descending=True)
        top = max(1, math.ceil(0.01 * f.num_rows))
        if f.num_rows >= 200:  # users, items: the hottest 1% of ids carry far more than 1% of lookups
            assert float(counts.values[:top].sum()) > 0.15 * ids.numel(), f.name
    _, ids, _ = big.sparse.feature("item")
    hottest = torch.bincount(ids, minlength=500).sort(descending=True).indices[:5]
    assert sorted(hottest.tolist()) != [0, 1, 2, 3, 4]  # a permutation decides which ids are hot


def test_pooling_factor_bags_and_teacher():
    data = SyntheticData(TINY, seed=0, pooling_factor=3)
    b = data.batch(5, 64)
    assert bool((b.sparse.lengths == 3).all()) and b.sparse.values.numel() == 3 * 64 * len(TINY.features)
    assert 0.65 < data.teacher_auc(4096) < 0.95
    with pytest.raises(ValueError, match="pooling_factor"):
        SyntheticData(TINY, pooling_factor=0)


def test_teacher_auc_ctr_and_normalized_entropy():
    data = SyntheticData(TINY, seed=3)
    teacher = data.teacher_auc(8192)
    assert 0.65 < teacher < 0.95
    b = data.batch(0, 8192, stream=HELDOUT)
    assert 0.15 < float(b.labels.mean()) < 0.4
    probs = data.probabilities(b.dense, b.sparse)
    assert auc(probs, b.labels) == pytest.approx(teacher, abs=0.03)
    base = torch.full_like(b.labels, float(b.labels.mean()))
    assert normalized_entropy(base, b.labels) == pytest.approx(1.0, abs=1e-9)
    assert normalized_entropy(probs, b.labels) < 0.95
    assert normalized_entropy(1 - probs, b.labels) > 1.0  # confidently wrong is worse than the base rate


def test_auc_against_brute_force_and_edge_cases():
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        scores = (torch.rand(200, generator=gen) * 8).floor() / 8  # many ties
        labels = (torch.rand(200, generator=gen) < 0.3).float()
        pos, neg = scores[labels == 1].tolist(), scores[labels == 0].tolist()
        brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
        assert auc(scores, labels) == pytest.approx(brute, abs=1e-12)
        assert auc(torch.exp(3 * scores) - 7, labels) == pytest.approx(brute, abs=1e-12)  # rank-based
    labels = torch.tensor([0.0, 0, 1, 1])
    assert auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert auc(torch.zeros(4), labels) == 0.5
    with pytest.raises(ValueError):
        auc(torch.rand(3), torch.zeros(3))


# --- Criteo TSV: the tiny config reads the first 4 integer and the first 5 categorical columns -------------

def criteo_line(rng: random.Random, label: str) -> str:
    dense = [str(rng.randint(-3, 300)) if rng.random() > 0.25 else "" for _ in range(13)]
    cats = [f"{rng.getrandbits(28):x}" if rng.random() > 0.15 else "" for _ in range(26)]
    return "\t".join([label, *dense, *cats]) + "\n"


# a line computed by hand: dense 5, -3 (-> 0), empty (-> 0), 7; categorical ff, empty, 10, abc, 3
HAND = "\t".join(["1", "5", "-3", "", "7", *["1"] * 9, "ff", "", "10", "abc", "3", *["0"] * 21]) + "\n"
HAND_IDS = [0xFF % 200, 0, 0x10 % 500, 0xABC % 40, 3 % 24]  # users, items, items, cities, hours


@pytest.fixture
def files(tmp_path):
    rng = random.Random(1)
    first = [HAND] + [criteo_line(rng, str(i % 2)) for i in range(24)]
    second = [criteo_line(rng, "1" if i % 3 == 0 else "0") for i in range(26)]
    second[6] = "0\t1\t2\n"  # line 7: too few columns
    second[9] = second[9].replace("\t", "\t1.5", 1)  # line 10: a float in the first dense column
    cols = second[15].split("\t")
    cols[14 + 2] = "0xg1"  # line 16: not hex, in a categorical column the model reads
    second[15] = "\t".join(cols)
    second[20] = "\t" + second[20].split("\t", 1)[1]  # line 21: empty label
    paths = [tmp_path / "day_0.tsv", tmp_path / "day_1.tsv"]
    paths[0].write_text("".join(first))
    paths[1].write_text("".join(second))
    return paths


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.dense, y.dense) and torch.equal(x.labels, y.labels)
        and torch.equal(x.sparse.lengths, y.sparse.lengths) and torch.equal(x.sparse.values, y.sparse.values)
        for x, y in zip(a, b, strict=True))


def test_criteo_hand_computed_line_fewer_features_and_stats(files, caplog):
    reader = CriteoReader(files, TINY, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="trainer.criteo"):
        batches = list(reader)
    assert [b.batch_size for b in batches] == [8] * 5 + [7]  # 51 lines, 4 malformed
    first = batches[0]
    assert first.dense.shape == (8, 4) and first.dense.dtype == torch.float32 and first.labels.dtype == torch.float32
    torch.testing.assert_close(first.dense[0], torch.tensor([math.log1p(5), 0.0, 0.0, math.log1p(7)]))
    assert float(first.labels[0]) == 1.0
    assert first.sparse.keys == ["user", "item", "last_item", "city", "hour"]
    assert bool((first.sparse.lengths == 1).all())
    assert [int(first.sparse.feature(k)[1][0]) for k in first.sparse.keys] == HAND_IDS
    for f in TINY.features:
        ids = torch.cat([b.sparse.feature(f.name)[1] for b in batches])
        assert int(ids.min()) >= 0 and int(ids.max()) < f.num_rows
    assert reader.stats.lines == 51 and reader.stats.malformed == 4
    assert sum(reader.stats.reasons.values()) == 4 and len(reader.stats.reasons) == 4
    assert any("dense" in r for r in reader.stats.reasons) and any("hex" in r for r in reader.stats.reasons)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "4" in warnings[0].getMessage()  # one summary at the end, not one per line
    again = list(reader)  # a second pass starts its counts afresh
    assert same(again, batches) and reader.stats.malformed == 4


def test_criteo_strict_names_the_second_file_and_its_line(files):
    with pytest.raises(ValueError, match=r"day_1\.tsv:7\b"):
        list(CriteoReader(files, TINY, batch_size=8, strict=True))
    assert len(list(CriteoReader(files[:1], TINY, batch_size=8, strict=True))) == 4  # the first file is clean


def test_criteo_workers_and_skip_batches(files):
    plain = list(CriteoReader(files, TINY, batch_size=8))
    reader = CriteoReader(files, TINY, batch_size=8, num_workers=2)
    assert same(list(reader), plain) and reader.stats.malformed == 4
    assert same(list(CriteoReader(files, TINY, batch_size=8, skip_batches=4)), plain[4:])
    assert list(CriteoReader(files, TINY, batch_size=8, skip_batches=10)) == []
