"""Re-sharding on the shard side: a staged assignment filled by pulling rows, then flipped in.

The coordinator prepares the new plan's assignment on every shard beside the live one (seeded initial
rows, so untouched rows equal a fresh table's), asks each destination to pull its rows straight from
the source shards (every chunk's CRC-32C checked), and then commits: the staged tables become the live
ones in one swap. Until then the live plan is untouched, so an abort only drops the staged tables.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import crc32c
import grpc
import torch

from embedding_service.errors import ShardError, data_loss, invalid, precondition
from embedding_service.tables import ShardTables, SliceState
from protos import codec, common_pb2, embedding_shard_pb2
from protos.plan import validate_assignment
from protos.shard_client import ShardClient

log = logging.getLogger(__name__)
_WEIGHTS = embedding_shard_pb2.RowChunk.DESCRIPTOR.fields_by_name["weights"].number
_STATES = embedding_shard_pb2.RowChunk.DESCRIPTOR.fields_by_name["optimizer_state"].number


@dataclass
class Staged:
    assignment: common_pb2.ShardAssignment
    tables: ShardTables


@dataclass
class PullResult:
    rows: int = 0
    chunks: int = 0
    bytes: int = 0
    sha256: bytes = b""


def chunk_digest(chunk: embedding_shard_pb2.RowChunk) -> bytes:
    h = hashlib.sha256(chunk.weights.data)
    for s in chunk.optimizer_state:
        h.update(s.data)
    return h.digest()


def data_crc32(parts) -> int:
    """CRC-32C (Castagnoli, SSE4.2 instructions where present: about 5x zlib's CRC-32 here)."""
    crc = 0
    for p in parts:
        crc = crc32c.crc32c(p, crc)
    return crc


def tensors_crc32(tensors: list[torch.Tensor]) -> int:
    return data_crc32(memoryview(t.contiguous().numpy()).cast("B") for t in tensors)


def verify_chunk(chunk: embedding_shard_pb2.RowChunk, i: int) -> None:
    """A chunk carries a SHA-256 or a CRC-32C of its data; either must match."""
    where = f"chunk {i} (table {chunk.table!r}, row_start {chunk.row_start})"
    if chunk.sha256:
        if chunk_digest(chunk) != chunk.sha256:
            raise data_loss(f"{where}: sha256 mismatch")
    elif chunk.HasField("crc32"):
        if data_crc32([chunk.weights.data, *(s.data for s in chunk.optimizer_state)]) != chunk.crc32:
            raise data_loss(f"{where}: crc32 mismatch")
    else:
        raise invalid(f"{where}: no checksum (sha256 or crc32)")


def check_pull(req: embedding_shard_pb2.PullRowsRequest, dest: SliceState, src_cols: int | None) -> int:
    """Validates the rectangle before any row moves; returns the number of columns."""
    n_rows = req.row_end - req.row_start
    if req.row_start < 0 or n_rows <= 0:
        raise invalid(f"row_start/row_end: [{req.row_start}, {req.row_end}) is not a non-empty range")
    if src_cols is None and not req.num_cols:  # a remote source: its width is known from the first chunk
        cols = 1
    else:
        cols = req.num_cols or ((src_cols or 0) - req.src_col_start)
        if cols <= 0 or req.src_col_start < 0 or (src_cols is not None and req.src_col_start + cols > src_cols):
            raise invalid(f"src_col_start/num_cols: [{req.src_col_start}, +{cols}) outside the source slice's "
                          f"{src_cols} columns")
    if (req.dest_row_start < 0 or req.dest_row_start + n_rows > dest.slice.num_rows or req.dest_col_start < 0
            or req.dest_col_start + cols > dest.slice.num_cols):
        raise invalid(f"dest_row_start/dest_col_start: rows [{req.dest_row_start}, +{n_rows}) cols "
                      f"[{req.dest_col_start}, +{cols}) outside dest slice {dest.index} of table "
                      f"{dest.table.name!r} [{dest.slice.num_rows} x {dest.slice.num_cols}]")
    return cols


def _cut(req: embedding_shard_pb2.PullRowsRequest, cols: int, weights: torch.Tensor,
         states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    c0 = req.src_col_start
    w = weights[:, c0 : c0 + cols]
    return w, [s[:, c0 : c0 + cols] if s.dim() == 2 else s for s in states]


def pull_remote(req: embedding_shard_pb2.PullRowsRequest, dest_tables: ShardTables, dest: SliceState,
                max_message_bytes: int, tls_ca: str | None = None, *, token: str | None = None,
                tls_cert: str | None = None, tls_key: str | None = None) -> PullResult:
    """Streams the rows from the source shard's ExportRows into the staged slice, chunk by chunk."""
    check_pull(req, dest, None)
    h, result = hashlib.sha256(), PullResult()
    client = ShardClient(req.source, plan_version=req.source_plan_version, max_message_bytes=max_message_bytes,
                         timeout=600.0, tls_ca=tls_ca, token=token,
                         tls_cert=tls_cert if tls_ca else None, tls_key=tls_key if tls_ca else None)
    try:
        chunks = client.export_rows_framed(req.source_slice, req.row_start, req.row_end, req.chunk_rows)
        for i, (chunk, views) in enumerate(chunks):
            wview = views.get(_WEIGHTS)
            if wview is None:
                raise data_loss(f"chunk {i} from {req.source}: no weights")
            sviews = views.get(_STATES, [])
            if data_crc32([wview.data, *(v.data for v in sviews)]) != chunk.crc32:
                raise data_loss(f"chunk {i} from {req.source} (table {chunk.table!r}, row_start {chunk.row_start}): "
                                "crc32 mismatch")
            if chunk.table != dest.table.name:
                raise invalid(f"source slice {req.source_slice} at {req.source} holds table {chunk.table!r}, "
                              f"dest slice {dest.index} holds {dest.table.name!r}")
            weights = codec.decode(wview, f"chunk {i} weights")
            states = [codec.decode(v, f"chunk {i} optimizer_state[{k}]") for k, v in enumerate(sviews)]
            cols = check_pull(req, dest, weights.shape[1])
            w, st = _cut(req, cols, weights, states)
            # rows of a live shard, checksummed on the way: no NaN scan (it would cost a third of the pull)
            dest_tables.write_block(dest, req.dest_row_start + chunk.row_start - req.row_start, req.dest_col_start,
                                    w, st, check_finite=False)
            h.update(chunk.crc32.to_bytes(4, "little"))
            result.rows += w.shape[0]
            result.chunks += 1
            result.bytes += len(wview.data) + sum(len(v.data) for v in sviews)
    except grpc.RpcError as e:  # the source failed or vanished: the pull fails, nothing is committed
        code = e.code() if e.code() not in (None, grpc.StatusCode.OK) else grpc.StatusCode.UNAVAILABLE
        raise ShardError(code, f"pull from {req.source} (slice {req.source_slice}): {e.details()}") from None
    finally:
        client.close()
    if result.rows != req.row_end - req.row_start:
        raise data_loss(f"pull from {req.source}: got {result.rows} rows of {req.row_end - req.row_start}")
    result.sha256 = h.digest()
    return result


def pull_local(req: embedding_shard_pb2.PullRowsRequest, live: ShardTables, dest_tables: ShardTables,
               dest: SliceState) -> PullResult:
    """Rows this shard keeps under the new plan: copied from its own live tables."""
    src = live.slice_at(req.source_slice)
    if src.table.name != dest.table.name:
        raise invalid(f"source_slice {req.source_slice} holds table {src.table.name!r}, dest slice {dest.index} "
                      f"holds {dest.table.name!r}")
    cols = check_pull(req, dest, src.slice.num_cols)
    if req.row_end > src.slice.num_rows:
        raise invalid(f"row_end: {req.row_end} beyond source slice {src.index} ({src.slice.num_rows} rows)")
    w, st = _cut(req, cols, src.weights[req.row_start : req.row_end].detach().cpu(),
                 [s[req.row_start : req.row_end].detach().cpu() for s in src.states])
    dest_tables.write_block(dest, req.dest_row_start, req.dest_col_start, w, st)
    crc = tensors_crc32([w, *st])
    return PullResult(rows=w.shape[0], chunks=1, bytes=sum(t.numel() * t.element_size() for t in (w, *st)),
                      sha256=hashlib.sha256(crc.to_bytes(4, "little")).digest())


def stage(assignment: common_pb2.ShardAssignment, live_version: int, shard_id: int, *, device: str, seed: int,
          clamp_ids: bool) -> Staged:
    if assignment.plan_version <= live_version:
        raise precondition(f"assignment.plan_version {assignment.plan_version}: must be newer than the live "
                           f"version {live_version}")
    if assignment.shard_id != shard_id:
        raise invalid(f"assignment.shard_id {assignment.shard_id}: this is shard {shard_id}")
    try:
        validate_assignment(assignment)
        tables = ShardTables(assignment, device=device, seed=seed, clamp_ids=clamp_ids)
    except ValueError as e:
        raise invalid(f"assignment: {e}") from None
    log.info("staged plan version %d: %d slices, %d weight bytes", assignment.plan_version,
             len(assignment.slices), tables.weight_bytes)
    return Staged(assignment, tables)
