"""Python client of the shard service (what trainers, the coordinator and tools use)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import codec, common_pb2, embedding_shard_pb2, embedding_shard_pb2_grpc, wire
from protos.channels import ChannelClient, open_channel
from protos.security import bearer_metadata

FeatureSpec = str | tuple[str, int]


_SERVICE = "/" + embedding_shard_pb2.DESCRIPTOR.services_by_name["EmbeddingShard"].full_name
_GRAD_FIELD = embedding_shard_pb2.UpdateRequest.DESCRIPTOR.fields_by_name["grad"].number
_EMB = frozenset({embedding_shard_pb2.LookupResponse.DESCRIPTOR.fields_by_name["embeddings"].number})


@dataclass
class LookupResult:
    handle: str
    # [B, sum(dims)] float32. With a float32 wire it aliases the response buffer: treat it as read-only.
    embeddings: torch.Tensor
    dims: list[int]

    def split(self) -> list[torch.Tensor]:
        return list(torch.split(self.embeddings, self.dims, dim=1))


def _lookup_result(raw: bytes) -> LookupResult:
    resp, tensors = wire.decode(raw, embedding_shard_pb2.LookupResponse, _EMB)
    view = tensors.get(next(iter(_EMB)))
    emb = codec.decode(view, "embeddings") if view is not None else torch.empty(0, 0)
    if emb.dtype != torch.float32:
        emb = emb.float()
    return LookupResult(resp.handle, emb, list(resp.dims))


_CHUNK_WEIGHTS = frozenset({embedding_shard_pb2.RowChunk.DESCRIPTOR.fields_by_name["weights"].number})
_CHUNK_STATES = frozenset({embedding_shard_pb2.RowChunk.DESCRIPTOR.fields_by_name["optimizer_state"].number})


def _row_chunk(raw: bytes) -> tuple[embedding_shard_pb2.RowChunk, dict]:
    return wire.decode(raw, embedding_shard_pb2.RowChunk, _CHUNK_WEIGHTS, _CHUNK_STATES)


class ShardClient(ChannelClient):
    """`token`: the shard's control-plane bearer token, sent with Checkpoint, Restore, ExportRows,
    ImportRows, Prepare, PullRows, Commit and Abort (never with the hot Lookup / Update). `tls_cert` /
    `tls_key`: this client's certificate, for shards that require mutual TLS."""

    def __init__(self, address: str, *, plan_version: int = 0, max_message_bytes: int = 256 * 1024 * 1024,
                 timeout: float = 120.0, tls_ca: str | None = None, token: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, trainer_epoch: int = 0) -> None:
        """`trainer_epoch`: the trainer's membership epoch, sent with every Lookup and Update so that a shard
        refuses a trainer of an earlier incarnation (0: none)."""
        self.address = address
        self.plan_version = plan_version
        self.trainer_epoch = trainer_epoch
        self.timeout = timeout
        self._auth = bearer_metadata(token) if token else None
        self.channel = open_channel(address, tls_ca=tls_ca, max_message_bytes=max_message_bytes,
                                    tls_cert=tls_cert, tls_key=tls_key)
        self.stub = embedding_shard_pb2_grpc.EmbeddingShardStub(self.channel)
        # the hot RPCs send pre-framed bytes and parse responses without copying tensors (protos.wire)
        self._lookup = self.channel.unary_unary(f"{_SERVICE}/Lookup", response_deserializer=_lookup_result)
        self._update = self.channel.unary_unary(
            f"{_SERVICE}/Update", response_deserializer=embedding_shard_pb2.UpdateResponse.FromString)

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout).status

    # -- training path ------------------------------------------------------------------------
    def _lookup_parts(self, features: Sequence[FeatureSpec], batch_size: int, lengths: torch.Tensor,
                      values: torch.Tensor, weights: torch.Tensor | None = None, *, trainer_id: int = 0,
                      step: int = 0, no_grad: bool = False, wire_dtype: torch.dtype = torch.float32,
                      plan_version: int | None = None) -> tuple[embedding_shard_pb2.LookupRequest, dict]:
        req = embedding_shard_pb2.LookupRequest(
            plan_version=self.plan_version if plan_version is None else plan_version,
            trainer_id=trainer_id, step=step, no_grad=no_grad, batch_size=batch_size,
            output_dtype=codec.proto_dtype(wire_dtype), trainer_epoch=self.trainer_epoch)
        for f in features:
            if isinstance(f, tuple):
                req.features.add(feature=f[0], slice=f[1])
            else:
                req.features.add(feature=f)
        tensors = {"lengths": lengths, "values": values}
        if weights is not None:
            tensors["weights"] = weights
        return req, tensors

    def lookup_request(self, *args, **kwargs) -> embedding_shard_pb2.LookupRequest:
        """The request as a protobuf message (for tools and tests that call `stub` directly)."""
        req, tensors = self._lookup_parts(*args, **kwargs)
        for name, t in tensors.items():
            codec.encode(t, getattr(req, name))
        return req

    def _lookup_bytes(self, *args, **kwargs) -> bytes:
        req, tensors = self._lookup_parts(*args, **kwargs)
        return wire.encode(req, {req.DESCRIPTOR.fields_by_name[n].number: t for n, t in tensors.items()})

    def lookup(self, *args, **kwargs) -> LookupResult:
        return self._lookup(self._lookup_bytes(*args, **kwargs), timeout=self.timeout)

    def lookup_async(self, *args, **kwargs) -> grpc.Future:
        """Returns a future whose `result()` is a LookupResult."""
        return self._lookup.future(self._lookup_bytes(*args, **kwargs), timeout=self.timeout)

    def update_request(self, handle: str, grad: torch.Tensor, wire_dtype: torch.dtype = torch.float32,
                       plan_version: int | None = None) -> embedding_shard_pb2.UpdateRequest:
        req = embedding_shard_pb2.UpdateRequest(
            plan_version=self.plan_version if plan_version is None else plan_version, handle=handle,
            trainer_epoch=self.trainer_epoch)
        codec.encode(grad.to(wire_dtype), req.grad)
        return req

    def _update_bytes(self, handle: str, grad: torch.Tensor, wire_dtype: torch.dtype,
                      plan_version: int | None) -> bytes:
        req = embedding_shard_pb2.UpdateRequest(
            plan_version=self.plan_version if plan_version is None else plan_version, handle=handle,
            trainer_epoch=self.trainer_epoch)
        return wire.encode(req, {_GRAD_FIELD: grad.to(wire_dtype)})

    def update(self, handle: str, grad: torch.Tensor, wire_dtype: torch.dtype = torch.float32,
               plan_version: int | None = None) -> embedding_shard_pb2.UpdateResponse:
        return self._update(self._update_bytes(handle, grad, wire_dtype, plan_version), timeout=self.timeout)

    def update_async(self, handle: str, grad: torch.Tensor, wire_dtype: torch.dtype = torch.float32,
                     plan_version: int | None = None) -> grpc.Future:
        return self._update.future(self._update_bytes(handle, grad, wire_dtype, plan_version), timeout=self.timeout)

    # -- rows and state -----------------------------------------------------------------------
    def lookup_rows(self, table: str, ids: torch.Tensor, slice: int | None = None) -> torch.Tensor:
        req = embedding_shard_pb2.LookupRowsRequest(plan_version=self.plan_version, ids=codec.encode(ids))
        req.table.feature = table
        if slice is not None:
            req.table.slice = slice
        return codec.decode(self.stub.LookupRows(req, timeout=self.timeout).rows, "rows").clone()

    def checkpoint(self, directory: str, step: int = 0) -> embedding_shard_pb2.CheckpointResponse:
        return self.stub.Checkpoint(embedding_shard_pb2.CheckpointRequest(
            plan_version=self.plan_version, directory=str(directory), step=step), timeout=self.timeout,
            metadata=self._auth)

    def restore(self, directory: str) -> embedding_shard_pb2.RestoreResponse:
        return self.stub.Restore(embedding_shard_pb2.RestoreRequest(
            plan_version=self.plan_version, directory=str(directory)), timeout=self.timeout, metadata=self._auth)

    def export_rows(self, slice: int, row_start: int, row_end: int,
                    chunk_rows: int = 0) -> Iterator[embedding_shard_pb2.RowChunk]:
        return self.stub.ExportRows(embedding_shard_pb2.ExportRowsRequest(
            plan_version=self.plan_version, slice=slice, row_start=row_start, row_end=row_end,
            chunk_rows=chunk_rows), timeout=self.timeout, metadata=self._auth)

    def export_rows_framed(self, slice: int, row_start: int, row_end: int, chunk_rows: int = 0
                           ) -> Iterator[tuple[embedding_shard_pb2.RowChunk, dict]]:
        """ExportRows with CRC-32C checksums, parsed without copies: (chunk fields, {field: TensorView(s)})."""
        call = self.channel.unary_stream(f"{_SERVICE}/ExportRows",
                                         request_serializer=embedding_shard_pb2.ExportRowsRequest.SerializeToString,
                                         response_deserializer=_row_chunk)
        return call(embedding_shard_pb2.ExportRowsRequest(plan_version=self.plan_version, slice=slice,
                                                          row_start=row_start, row_end=row_end, chunk_rows=chunk_rows,
                                                          crc32=True), timeout=self.timeout, metadata=self._auth)

    def import_rows(self, chunks: Iterable[embedding_shard_pb2.RowChunk]) -> embedding_shard_pb2.ImportRowsResponse:
        return self.stub.ImportRows(iter(chunks), timeout=self.timeout, metadata=self._auth)

    def info(self) -> embedding_shard_pb2.InfoResponse:
        return self.stub.Info(embedding_shard_pb2.InfoRequest(), timeout=self.timeout)

    # -- re-sharding (driven by the coordinator) ----------------------------------------------
    def prepare(self, assignment: common_pb2.ShardAssignment) -> embedding_shard_pb2.PrepareResponse:
        return self.stub.Prepare(embedding_shard_pb2.PrepareRequest(assignment=assignment),
                                 timeout=self.timeout, metadata=self._auth)

    def pull_rows(self, request: embedding_shard_pb2.PullRowsRequest,
                  timeout: float | None = None) -> embedding_shard_pb2.PullRowsResponse:
        return self.stub.PullRows(request, timeout=timeout or self.timeout, metadata=self._auth)

    def commit(self, plan_version: int, applied_step: int) -> embedding_shard_pb2.CommitResponse:
        return self.stub.Commit(embedding_shard_pb2.CommitRequest(plan_version=plan_version, applied_step=applied_step),
                                timeout=self.timeout, metadata=self._auth)

    def abort(self, plan_version: int) -> embedding_shard_pb2.AbortResponse:
        return self.stub.Abort(embedding_shard_pb2.AbortRequest(plan_version=plan_version), timeout=self.timeout,
                               metadata=self._auth)


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
