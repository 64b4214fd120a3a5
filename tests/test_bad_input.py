"""Bad input gets a precise status naming the field, changes nothing, and the server keeps serving."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from embedding_service.process import launch
from protos import codec, common_pb2, embedding_shard_pb2
from protos.shard_client import ShardClient

TABLES = [
    {"name": "users", "num_rows": 100, "dim": 8, "features": ["user"],
     "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.1}},
    {"name": "items", "num_rows": 50, "dim": 4, "features": ["item"], "pooling": "mean",
     "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.1}},
]
FEATURES = ["user", "item"]
CONFIG = {"plan_version": 7, "seed": 3, "handle_ttl_s": 3.0, "tables": TABLES,
          "server": {"max_message_bytes": 1024 * 1024}}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    proc = launch(CONFIG, workdir=tmp_path_factory.mktemp("bad-input"))
    client = ShardClient(proc.address, plan_version=7, max_message_bytes=64 * 1024 * 1024)
    yield client
    client.close()
    proc.kill()


def good_batch():
    return torch.tensor([2, 2, 1, 1]), torch.tensor([5, 6, 7, 8, 9, 10])


def weights_of(client) -> list[torch.Tensor]:
    return [client.lookup_rows(t["name"], torch.arange(t["num_rows"])) for t in TABLES]


class Steps:
    n = 0

    @classmethod
    def next(cls) -> int:
        cls.n += 1
        return cls.n


def expect(code: grpc.StatusCode, *needles: str):
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, typ, err, tb):
            assert typ is not None and issubclass(typ, grpc.RpcError), "expected an RpcError"
            assert err.code() == code, (err.code(), err.details())
            for n in needles:
                assert n in err.details(), (n, err.details())
            return True

    return _Ctx()


def assert_still_serving(client, before):
    after = weights_of(client)
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)
    lengths, values = good_batch()
    res = client.lookup(FEATURES, 2, lengths, values, step=Steps.next())
    client.update(res.handle, torch.zeros(2, 12))  # zero gradient: the weights stay comparable


LOOKUP_CASES = {
    "id out of range": (dict(values=torch.tensor([5, 6, 7, 8, 9, 100])), grpc.StatusCode.INVALID_ARGUMENT,
                        ("item", "items", "100", "[0, 50)")),
    "negative id": (dict(values=torch.tensor([-1, 6, 7, 8, 9, 10])), grpc.StatusCode.INVALID_ARGUMENT,
                    ("user", "-1")),
    "lengths do not add up": (dict(values=torch.tensor([5, 6, 7])), grpc.StatusCode.INVALID_ARGUMENT,
                              ("lengths", "6", "3")),
    "wrong lengths count": (dict(lengths=torch.tensor([1, 2, 3])), grpc.StatusCode.INVALID_ARGUMENT,
                            ("lengths", "4 entries")),
    "negative length": (dict(lengths=torch.tensor([3, -1, 2, 2])), grpc.StatusCode.INVALID_ARGUMENT,
                        ("negative length",)),
    # four huge lengths: their int64 sum wraps to the right total of 6 ids
    "huge lengths": (dict(lengths=torch.tensor([1, 2, 2, 1]) + (1 << 62)), grpc.StatusCode.INVALID_ARGUMENT,
                     ("lengths", "exceeds the 6 ids")),
    "unknown feature": (dict(features=["user", "colour"]), grpc.StatusCode.INVALID_ARGUMENT, ("colour",)),
    "float ids": (dict(values=torch.rand(6)), grpc.StatusCode.INVALID_ARGUMENT, ("values", "dtype")),
    "weights on MEAN": (dict(weights=torch.full((6,), 2.0)), grpc.StatusCode.INVALID_ARGUMENT, ("item", "MEAN")),
    "wrong plan version": (dict(plan_version=6), grpc.StatusCode.FAILED_PRECONDITION, ("plan_version 6", "7")),
    "trainer out of range": (dict(trainer_id=3), grpc.StatusCode.INVALID_ARGUMENT, ("trainer_id",)),
}


@pytest.mark.parametrize("case", list(LOOKUP_CASES))
def test_bad_lookup(shard, case):
    before = weights_of(shard)
    override, code, needles = LOOKUP_CASES[case]
    lengths, values = good_batch()
    kwargs = dict(features=FEATURES, batch_size=2, lengths=lengths, values=values, step=Steps.next())
    kwargs.update({k: v for k, v in override.items() if k in kwargs})
    extra = {k: v for k, v in override.items() if k not in kwargs}
    with expect(code, *needles):
        shard.lookup(**kwargs, **extra)
    assert_still_serving(shard, before)


def test_corrupt_tensor_bytes(shard):
    before = weights_of(shard)
    lengths, values = good_batch()
    req = shard.lookup_request(FEATURES, 2, lengths, values, step=Steps.next())
    req.values.data = req.values.data[:-3]
    with expect(grpc.StatusCode.INVALID_ARGUMENT, "values", "bytes"):
        shard.stub.Lookup(req)
    assert_still_serving(shard, before)


GRAD_CASES = {
    "wrong shape": (torch.zeros(2, 11), ("grad", "[2, 12]")),
    "wrong dtype": (torch.zeros(2, 12, dtype=torch.int64), ("grad", "dtype")),
    "NaN": (torch.zeros(2, 12).index_fill_(1, torch.tensor([9]), float("nan")), ("NaN", "item")),
    "Inf": (torch.zeros(2, 12).index_fill_(1, torch.tensor([0]), float("inf")), ("NaN or Inf", "user")),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_bad_update_keeps_weights_and_handle(shard, case):
    lengths, values = good_batch()
    res = shard.lookup(FEATURES, 2, lengths, values, step=Steps.next())
    before = weights_of(shard)
    grad, needles = GRAD_CASES[case]
    req = shard.update_request(res.handle, torch.zeros(1))
    codec.encode(grad, req.grad)  # as sent, without the client's cast to the wire dtype
    with expect(grpc.StatusCode.INVALID_ARGUMENT, *needles):
        shard.stub.Update(req)
    for a, b in zip(weights_of(shard), before, strict=True):
        assert torch.equal(a, b)
    shard.update(res.handle, torch.zeros(2, 12))  # the handle survived the bad attempt
    assert_still_serving(shard, before)


def test_unknown_and_expired_handles(shard):
    before = weights_of(shard)
    with expect(grpc.StatusCode.NOT_FOUND, "unknown"):
        shard.update("t0-s1-999999", torch.zeros(2, 12))
    lengths, values = good_batch()
    res = shard.lookup(FEATURES, 2, lengths, values, step=Steps.next())
    time.sleep(3.5)  # ttl 3 s
    with expect(grpc.StatusCode.NOT_FOUND, "expired"):
        shard.update(res.handle, torch.ones(2, 12))
    assert_still_serving(shard, before)


def test_oversize_message_is_resource_exhausted(shard):
    before = weights_of(shard)
    n = 300_000  # 2.4 MB of int64 ids, over the server's 1 MiB limit
    lengths = torch.tensor([n, 0, 0, 0])
    with expect(grpc.StatusCode.RESOURCE_EXHAUSTED):
        shard.lookup(FEATURES, 2, lengths, torch.zeros(n, dtype=torch.int64), step=Steps.next())
    assert_still_serving(shard, before)


def test_bad_wire_dtype_and_rows(shard):
    before = weights_of(shard)
    lengths, values = good_batch()
    req = shard.lookup_request(FEATURES, 2, lengths, values, step=Steps.next())
    req.output_dtype = common_pb2.INT8
    with expect(grpc.StatusCode.INVALID_ARGUMENT, "output_dtype"):
        shard.stub.Lookup(req)
    with expect(grpc.StatusCode.INVALID_ARGUMENT, "users", "100"):
        shard.lookup_rows("users", torch.tensor([0, 100]))
    with expect(grpc.StatusCode.INVALID_ARGUMENT, "nope"):
        shard.lookup_rows("nope", torch.tensor([0]))
    with expect(grpc.StatusCode.FAILED_PRECONDITION, "manifest.json"):
        shard.restore("nonexistent-dir")  # inside the checkpoint root; outside it: tests/test_confined_paths.py
    with expect(grpc.StatusCode.INVALID_ARGUMENT, "directory"):
        shard.stub.Checkpoint(embedding_shard_pb2.CheckpointRequest(plan_version=7))
    with expect(grpc.StatusCode.INVALID_ARGUMENT, "empty"):
        shard.import_rows([])
    bad_chunk = embedding_shard_pb2.RowChunk(plan_version=7, table="users", slice=0, row_start=95)
    codec.encode(torch.zeros(10, 8), bad_chunk.weights)
    codec.encode(torch.zeros(10), bad_chunk.optimizer_state.add())
    from embedding_service.servicer import chunk_digest

    bad_chunk.sha256 = chunk_digest(bad_chunk)
    with expect(grpc.StatusCode.INVALID_ARGUMENT, "row_start", "users"):
        shard.import_rows([bad_chunk])
    assert_still_serving(shard, before)


def test_malformed_protobuf_bytes(shard):
    before = weights_of(shard)
    raw_lookup = shard.channel.unary_unary("/recsys.v1.EmbeddingShard/Lookup")
    with expect(grpc.StatusCode.INVALID_ARGUMENT, "malformed LookupRequest"):
        raw_lookup(b"\xff" * 12)
    raw_update = shard.channel.unary_unary("/recsys.v1.EmbeddingShard/Update")
    with expect(grpc.StatusCode.INVALID_ARGUMENT, "malformed UpdateRequest"):
        raw_update(b"\x1a\x05ab")
    assert_still_serving(shard, before)
