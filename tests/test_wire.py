"""protos.wire frames tensors in standard protobuf wire format, without copies, and rejects garbage."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError

from protos import codec, embedding_shard_pb2, wire

FIELDS = frozenset({7, 8, 9})  # LookupRequest.lengths, values, weights


def sample_request() -> tuple[embedding_shard_pb2.LookupRequest, dict[int, torch.Tensor]]:
    msg = embedding_shard_pb2.LookupRequest(plan_version=3, trainer_id=1, step=-5, batch_size=2)
    msg.features.add(feature="a")
    msg.features.add(feature="b", slice=4)
    tensors = {7: torch.tensor([1, 2, 0, 3], dtype=torch.int32), 8: torch.arange(6),
               9: torch.rand(6).to(torch.bfloat16)}
    return msg, tensors


def test_encoding_is_what_protobuf_parses():
    msg, tensors = sample_request()
    raw = wire.encode(msg, tensors)
    parsed = embedding_shard_pb2.LookupRequest.FromString(raw)
    assert parsed.plan_version == 3 and parsed.step == -5 and parsed.features[1].slice == 4
    assert torch.equal(codec.decode(parsed.lengths), tensors[7])
    assert torch.equal(codec.decode(parsed.values), tensors[8])
    assert torch.equal(codec.decode(parsed.weights), tensors[9])


def test_decoding_protobuf_bytes_aliases_the_buffer():
    msg, tensors = sample_request()
    full = embedding_shard_pb2.LookupRequest()
    full.CopyFrom(msg)
    for field, name in ((7, "lengths"), (8, "values"), (9, "weights")):
        codec.encode(tensors[field], getattr(full, name))
    raw = full.SerializeToString()
    small, views = wire.decode(raw, embedding_shard_pb2.LookupRequest, FIELDS)
    assert small.trainer_id == 1 and [f.feature for f in small.features] == ["a", "b"]
    assert not small.HasField("values")
    for field, t in tensors.items():
        assert torch.equal(codec.decode(views[field]), t)
    assert views[8].data.obj is raw  # a view into the received bytes, not a copy


def test_empty_and_zero_dim_tensors():
    msg = embedding_shard_pb2.LookupResponse(handle="h", dims=[0])
    raw = wire.encode(msg, {2: torch.empty(4, 0)})
    back, views = wire.decode(raw, embedding_shard_pb2.LookupResponse, frozenset({2}))
    assert back.handle == "h" and codec.decode(views[2]).shape == (4, 0)


@pytest.mark.parametrize("cut", [1, 5, 17, 40])
def test_truncated_messages_raise_decode_error(cut):
    msg, tensors = sample_request()
    raw = wire.encode(msg, tensors)
    with pytest.raises((DecodeError, codec.CodecError)):
        _, views = wire.decode(raw[:-cut], embedding_shard_pb2.LookupRequest, FIELDS)
        for v in views.values():
            codec.decode(v)


def test_garbage_raises_decode_error():
    with pytest.raises(DecodeError):
        wire.decode(b"\xff" * 12, embedding_shard_pb2.LookupRequest, FIELDS)
