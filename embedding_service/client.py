"""Python client of the shard service (what trainers, the coordinator and tools use)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_service.server import channel_options
from protos import codec, embedding_shard_pb2, embedding_shard_pb2_grpc

FeatureSpec = str | tuple[str, int]


@dataclass
class LookupResult:
    handle: str
    embeddings: torch.Tensor  # [B, sum(dims)] float32 (read-only view when the wire was float32)
    dims: list[int]

    def split(self) -> list[torch.Tensor]:
        return list(torch.split(self.embeddings, self.dims, dim=1))


def _lookup_result(resp: embedding_shard_pb2.LookupResponse) -> LookupResult:
    emb = codec.decode(resp.embeddings, "embeddings")
    if emb.dtype != torch.float32:
        emb = emb.float()
    return LookupResult(resp.handle, emb, list(resp.dims))


class _Future:
    def __init__(self, fut: grpc.Future, convert) -> None:
        self._fut, self._convert = fut, convert

    def result(self, timeout: float | None = None):
        return self._convert(self._fut.result(timeout))


class ShardClient:
    def __init__(self, address: str, *, plan_version: int = 0, max_message_bytes: int = 256 * 1024 * 1024,
                 timeout: float = 120.0) -> None:
        self.address = address
        self.plan_version = plan_version
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self.stub = embedding_shard_pb2_grpc.EmbeddingShardStub(self.channel)

    def __enter__(self) -> ShardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout).status

    # -- training path ------------------------------------------------------------------------
    def lookup_request(self, features: Sequence[FeatureSpec], batch_size: int, lengths: torch.Tensor,
                       values: torch.Tensor, weights: torch.Tensor | None = None, *, trainer_id: int = 0,
                       step: int = 0, no_grad: bool = False, wire_dtype: torch.dtype = torch.float32,
                       plan_version: int | None = None) -> embedding_shard_pb2.LookupRequest:
        req = embedding_shard_pb2.LookupRequest(
            plan_version=self.plan_version if plan_version is None else plan_version,
            trainer_id=trainer_id, step=step, no_grad=no_grad, batch_size=batch_size,
            output_dtype=codec.proto_dtype(wire_dtype))
        for f in features:
            if isinstance(f, tuple):
                req.features.add(feature=f[0], slice=f[1])
            else:
                req.features.add(feature=f)
        codec.encode(lengths, req.lengths)
        codec.encode(values, req.values)
        if weights is not None:
            codec.encode(weights, req.weights)
        return req

    def lookup(self, *args, **kwargs) -> LookupResult:
        return _lookup_result(self.stub.Lookup(self.lookup_request(*args, **kwargs), timeout=self.timeout))

    def lookup_async(self, *args, **kwargs) -> _Future:
        return _Future(self.stub.Lookup.future(self.lookup_request(*args, **kwargs), timeout=self.timeout),
                       _lookup_result)

    def update_request(self, handle: str, grad: torch.Tensor, wire_dtype: torch.dtype = torch.float32,
                       plan_version: int | None = None) -> embedding_shard_pb2.UpdateRequest:
        req = embedding_shard_pb2.UpdateRequest(
            plan_version=self.plan_version if plan_version is None else plan_version, handle=handle)
        codec.encode(grad.to(wire_dtype), req.grad)
        return req

    def update(self, handle: str, grad: torch.Tensor, wire_dtype: torch.dtype = torch.float32,
               plan_version: int | None = None) -> embedding_shard_pb2.UpdateResponse:
        return self.stub.Update(self.update_request(handle, grad, wire_dtype, plan_version), timeout=self.timeout)

    def update_async(self, handle: str, grad: torch.Tensor, wire_dtype: torch.dtype = torch.float32) -> _Future:
        return _Future(self.stub.Update.future(self.update_request(handle, grad, wire_dtype), timeout=self.timeout),
                       lambda r: r)

    # -- rows and state -----------------------------------------------------------------------
    def lookup_rows(self, table: str, ids: torch.Tensor, slice: int | None = None) -> torch.Tensor:
        req = embedding_shard_pb2.LookupRowsRequest(plan_version=self.plan_version, ids=codec.encode(ids))
        req.table.feature = table
        if slice is not None:
            req.table.slice = slice
        return codec.decode(self.stub.LookupRows(req, timeout=self.timeout).rows, "rows").clone()

    def checkpoint(self, directory: str, step: int = 0) -> embedding_shard_pb2.CheckpointResponse:
        return self.stub.Checkpoint(embedding_shard_pb2.CheckpointRequest(
            plan_version=self.plan_version, directory=str(directory), step=step), timeout=self.timeout)

    def restore(self, directory: str) -> embedding_shard_pb2.RestoreResponse:
        return self.stub.Restore(embedding_shard_pb2.RestoreRequest(
            plan_version=self.plan_version, directory=str(directory)), timeout=self.timeout)

    def export_rows(self, slice: int, row_start: int, row_end: int,
                    chunk_rows: int = 0) -> Iterator[embedding_shard_pb2.RowChunk]:
        return self.stub.ExportRows(embedding_shard_pb2.ExportRowsRequest(
            plan_version=self.plan_version, slice=slice, row_start=row_start, row_end=row_end,
            chunk_rows=chunk_rows), timeout=self.timeout)

    def import_rows(self, chunks: Iterable[embedding_shard_pb2.RowChunk]) -> embedding_shard_pb2.ImportRowsResponse:
        return self.stub.ImportRows(iter(chunks), timeout=self.timeout)

    def info(self) -> embedding_shard_pb2.InfoResponse:
        return self.stub.Info(embedding_shard_pb2.InfoRequest(), timeout=self.timeout)


def migrate_rows(src: ShardClient, dst: ShardClient, *, src_slice: int, row_start: int, row_end: int,
                 dst_slice: int, dst_row_start: int, chunk_rows: int = 0) -> embedding_shard_pb2.ImportRowsResponse:
    """Streams rows [row_start, row_end) of a source slice into a destination slice, shard to shard.

    Chunks keep their checksum (it covers the data only); slice, row and plan version are rewritten
    for the destination, which verifies every chunk before it applies any.
    """
    shift = dst_row_start - row_start

    def rewritten() -> Iterator[embedding_shard_pb2.RowChunk]:
        for chunk in src.export_rows(src_slice, row_start, row_end, chunk_rows):
            chunk.slice = dst_slice
            chunk.row_start += shift
            chunk.plan_version = dst.plan_version
            yield chunk

    return dst.import_rows(rewritten())
