"""In-process units: tensor codec, committed stubs, config parsing, initialisation, id clamping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embedding_service.config import ShardConfig
from embedding_service.errors import ShardError
from embedding_service.tables import ShardTables
from protos import codec, common_pb2
from protos.plan import assignment_from_dict
from protos.table_init import initial_rows

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                   torch.uint8, torch.int8])
def test_codec_roundtrip(dtype):
    t = (torch.randn(3, 5) * 50).to(dtype)
    msg = codec.encode(t)
    assert len(msg.data) == t.numel() * t.element_size() and list(msg.shape) == [3, 5]
    back = codec.decode(common_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)


def test_codec_rejects_mismatched_bytes_and_dtype():
    msg = codec.encode(torch.zeros(4))
    msg.shape[:] = [5]
    with pytest.raises(codec.CodecError, match="grad: 16 bytes do not match shape"):
        codec.decode(msg, "grad")
    msg = common_pb2.Tensor(dtype=0, shape=[1], data=b"\0" * 4)
    with pytest.raises(codec.CodecError, match="values: unsupported dtype"):
        codec.decode(msg, "values")
    assert codec.decode(codec.encode(torch.zeros(0, 3))).shape == (0, 3)


def test_generated_stubs_are_current():
    out = subprocess.run([sys.executable, "-m", "protos.build", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_initialisation_is_the_same_whatever_the_sharding():
    a = assignment_from_dict({"tables": [{"name": "t", "num_rows": 150_000, "dim": 6, "features": ["f"]}]})
    t = a.tables[0]
    full = initial_rows(t, 3, 0, t.num_rows, 0, t.dim)
    bound = (1 / t.num_rows) ** 0.5
    assert full.abs().max() <= bound and full.std() > bound / 3
    assert torch.equal(initial_rows(t, 3, 65_000, 140_000, 2, 5), full[65_000:140_000, 2:5])
    assert not torch.equal(initial_rows(t, 4, 0, 10, 0, 6), full[:10])


def test_clamp_ids_only_when_configured():
    a = assignment_from_dict({"tables": [{"name": "t", "num_rows": 10, "dim": 4, "features": ["f"]}]})
    strict = ShardTables(a)
    with pytest.raises(ShardError, match="id 12 out of range"):
        strict.prepare([("f", None)], 1, torch.tensor([2]), torch.tensor([3, 12]), None)
    lenient = ShardTables(a, clamp_ids=True)
    values = torch.tensor([3, 12])
    batch = lenient.prepare([("f", None)], 1, torch.tensor([2]), values, None)
    assert batch.values.tolist() == [3, 9] and values.tolist() == [3, 12]


def test_config_yaml_and_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("""
shard_id: 2
plan_version: 5
mode: async
staleness: 2
tables:
  - {name: t, num_rows: 10, dim: 4, features: [f, g], pooling: mean,
     optimizer: {type: exact_adagrad, learning_rate: 0.5}}
slices:
  - {table: t, row_offset: 0, num_rows: 10, col_offset: 2, num_cols: 2, sharding_type: column_wise}
server: {port: 0, metrics_port: null}
""")
    cfg = ShardConfig.load(p)
    assert cfg.assignment.shard_id == 2 and cfg.assignment.plan_version == 5 and cfg.staleness == 2
    assert cfg.assignment.tables[0].pooling == common_pb2.MEAN
    assert cfg.assignment.slices[0].sharding_type == common_pb2.COLUMN_WISE
    assert cfg.server.metrics_port is None
    with pytest.raises(ValueError, match="unknown shard config keys"):
        ShardConfig.from_dict({"tables": [{"name": "t", "num_rows": 1, "dim": 1, "features": ["f"]}], "oops": 1})
    with pytest.raises(ValueError, match=r"optimizer\.type: unknown value 'sgdd'"):
        ShardConfig.from_dict({"tables": [{"name": "t", "num_rows": 1, "dim": 1, "features": ["f"],
                                           "optimizer": {"type": "sgdd"}}]})
    with pytest.raises(ValueError, match="feature 'f' maps to both"):
        ShardConfig.from_dict({"tables": [{"name": "t", "num_rows": 1, "dim": 1, "features": ["f"]},
                                          {"name": "u", "num_rows": 1, "dim": 1, "features": ["f"]}]})


def test_row_chunks_are_verified_by_sha256_or_crc32c():
    import grpc
    import pytest
    import torch

    from embedding_service.errors import ShardError
    from embedding_service.resharding import chunk_digest, data_crc32, verify_chunk
    from protos import codec, embedding_shard_pb2

    chunk = embedding_shard_pb2.RowChunk(table="t", row_start=0)
    codec.encode(torch.arange(12, dtype=torch.float32).view(3, 4), chunk.weights)
    codec.encode(torch.ones(3), chunk.optimizer_state.add())
    with pytest.raises(ShardError) as e:
        verify_chunk(chunk, 0)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no checksum" in e.value.message
    chunk.crc32 = data_crc32([chunk.weights.data, chunk.optimizer_state[0].data])
    verify_chunk(chunk, 0)
    chunk.crc32 ^= 1
    with pytest.raises(ShardError) as e:
        verify_chunk(chunk, 3)
    assert e.value.code == grpc.StatusCode.DATA_LOSS and "chunk 3" in e.value.message and "crc32" in e.value.message
    chunk.ClearField("crc32")
    chunk.sha256 = chunk_digest(chunk)
    verify_chunk(chunk, 0)
    chunk.weights.data = chunk.weights.data[:-1] + b"\x00"
    with pytest.raises(ShardError) as e:
        verify_chunk(chunk, 0)
    assert e.value.code == grpc.StatusCode.DATA_LOSS and "sha256" in e.value.message
