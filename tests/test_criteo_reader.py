"""The Criteo TSV reader on a small file with empty fields and malformed lines."""

from __future__ import annotations

import math
import random

import pytest
import torch

from protos.model_config import ModelConfig
from trainer.criteo import CriteoReader

CONFIG = ModelConfig.from_dict({
    "dense": {"dense_features": 13, "bottom_mlp": [16, 8], "top_mlp": [16, 1]},
    "tables": [{"name": f"t{i}", "num_rows": 1000, "dim": 8, "features": [f"c{i}"]} for i in range(26)]})


def line(rng: random.Random, label: str = "1") -> str:
    dense = [str(rng.randint(-2, 500)) if rng.random() > 0.2 else "" for _ in range(13)]
    cats = [f"{rng.getrandbits(32):08x}" if rng.random() > 0.1 else "" for _ in range(26)]
    return "\t".join([label, *dense, *cats]) + "\n"


@pytest.fixture
def tsv(tmp_path):
    rng = random.Random(0)
    lines = [line(rng, str(i % 2)) for i in range(47)]
    lines[5] = "1\t2\t3\n"  # too few columns
    lines[11] = lines[11].replace("\t", "\tx", 1)  # non-integer dense
    lines[20] = "2" + lines[20][1:]  # bad label
    cols = lines[30].split("\t")
    cols[20] = "zz"  # non-hex categorical
    lines[30] = "\t".join(cols)
    path = tmp_path / "day_0.tsv"
    path.write_text("".join(lines))
    return path, lines


def test_values_and_malformed_counts(tsv):
    path, lines = tsv
    reader = CriteoReader([path], CONFIG, batch_size=16)
    batches = list(reader)
    assert [b.batch_size for b in batches] == [16, 16, 11]
    assert reader.stats.lines == 47 and reader.stats.malformed == 4
    assert set(reader.stats.reasons) == {"3 columns, expected 40", "non-integer dense value", "label not 0/1",
                                         "non-hex categorical value"}
    cols = lines[0].rstrip("\n").split("\t")
    first = batches[0]
    assert first.labels[0] == float(cols[0])
    want_dense = [math.log1p(max(int(x), 0)) if x else 0.0 for x in cols[1:14]]
    torch.testing.assert_close(first.dense[0], torch.tensor(want_dense))
    for i in (0, 7, 25):
        _, ids, _ = first.sparse.feature(f"c{i}")
        x = cols[14 + i]
        assert int(ids[0]) == (int(x, 16) % 1000 if x else 0)


def test_strict_names_file_and_line(tsv):
    path, _ = tsv
    with pytest.raises(ValueError, match=r"day_0\.tsv:6: malformed line \(3 columns"):
        list(CriteoReader([path], CONFIG, batch_size=16, strict=True))


def test_workers_and_skip_give_the_same_batches(tsv):
    path, _ = tsv
    plain = list(CriteoReader([path], CONFIG, batch_size=8))
    pooled = list(CriteoReader([path], CONFIG, batch_size=8, num_workers=2))
    skipped = list(CriteoReader([path, path], CONFIG, batch_size=8, skip_batches=2))
    assert len(plain) == len(pooled) == 6
    for a, b in zip(plain, pooled, strict=True):
        assert torch.equal(a.sparse.values, b.sparse.values) and torch.equal(a.dense, b.dense)
    assert torch.equal(skipped[0].sparse.values, plain[2].sparse.values)
    assert sum(b.batch_size for b in skipped) == 2 * 43 - 16


def test_every_categorical_column_is_checked_and_crlf_is_accepted(tmp_path):
    rng = random.Random(1)
    good = line(rng).rstrip("\n")
    cols = good.split("\t")
    cols[-1] = ""  # an empty last column, then a Windows line end
    crlf = "\t".join(cols) + "\r\n"
    bad_unused = good.split("\t")
    bad_unused[-1] = "0x1f"  # prefixed hex in C26, a column a 5-feature model does not read
    path = tmp_path / "mixed.tsv"
    path.write_text(crlf + "\t".join(bad_unused) + "\n")
    tiny = ModelConfig.from_dict({
        "dense": {"dense_features": 13, "bottom_mlp": [16, 8], "top_mlp": [16, 1]},
        "tables": [{"name": f"t{i}", "num_rows": 100, "dim": 8, "features": [f"c{i}"]} for i in range(5)]})
    for config in (CONFIG, tiny):
        reader = CriteoReader([path], config, batch_size=4)
        assert sum(b.batch_size for b in reader) == 1
        assert dict(reader.stats.reasons) == {"non-hex categorical value": 1}
