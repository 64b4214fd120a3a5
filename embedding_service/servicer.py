"""The EmbeddingShard gRPC servicer: decode, validate, run, encode. State lives in tables/steps."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from google.protobuf.message import DecodeError, Message

from embedding_service import checkpoint
from embedding_service.config import ShardConfig
from embedding_service.errors import ShardError, invalid, precondition
from embedding_service.metrics import ShardMetrics
from embedding_service.publisher import DeltaPublisher, SliceRows
from embedding_service.resharding import (
    Staged,
    chunk_digest,
    pull_local,
    pull_remote,
    stage,
    tensors_crc32,
    verify_chunk,
)
from embedding_service.steps import StepGroup, StepScheduler
from embedding_service.tables import ShardTables
from protos import codec, common_pb2, embedding_shard_pb2, embedding_shard_pb2_grpc, failpoints, wire
from protos.paths import PathRefused, confine, ensure_root, status_of_oserror
from protos.rejects import UNDECODABLE, Rejects

log = logging.getLogger(__name__)

_SERVICE = embedding_shard_pb2.DESCRIPTOR.services_by_name["EmbeddingShard"].full_name
# Every RPC that checkpoints, restores, stages, moves or commits rows (DESIGN.md "Planes and credentials").
# ExportRows is here too: it serves only migrations (PullRows of a peer shard) and streams whole slices
# with their optimizer state, the model itself. Lookup, Update (the trainers' data plane), LookupRows and
# Info (reads of single rows and counters) stay data plane.
CONTROL_PLANE = ("Checkpoint", "Restore", "ExportRows", "ImportRows", "Prepare", "PullRows", "Commit", "Abort")
_EMBEDDINGS_FIELD = embedding_shard_pb2.LookupResponse.DESCRIPTOR.fields_by_name["embeddings"].number
_WEIGHTS_FIELD = embedding_shard_pb2.RowChunk.DESCRIPTOR.fields_by_name["weights"].number
_STATE_FIELD = embedding_shard_pb2.RowChunk.DESCRIPTOR.fields_by_name["optimizer_state"].number
_WIRE_OUT = {0: torch.float32, common_pb2.FLOAT32: torch.float32, common_pb2.FLOAT16: torch.float16,
             common_pb2.BFLOAT16: torch.bfloat16}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, ShardError):
        return err.code, err.message
    if isinstance(err, codec.CodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    if isinstance(err, PathRefused):
        return err.code, err.message
    if isinstance(err, OSError):  # a file error outside Checkpoint / Restore's own mapping: still precise
        refused = status_of_oserror(err, method)
        return refused.code, refused.message
    log.exception("%s failed", method)
    return grpc.StatusCode.INTERNAL, f"{method}: internal error: {err}"


@contextlib.contextmanager
def _served(servicer: ShardServicer, method: str, context: grpc.ServicerContext) -> Iterator[None]:
    """Metrics and error mapping around one RPC: an exception becomes a precise status."""
    start = time.perf_counter()
    code = "OK"
    try:
        yield
    except Exception as e:
        aborted = context.code()  # a guard below the handler refused a streamed message: keep its status
        if aborted is not None:
            code = aborted.name
            raise
        status, message = _status(e, method)
        code = status.name
        context.abort(status, message)
    finally:
        servicer.metrics.requests.labels(method, code).inc()
        servicer.metrics.latency.labels(method).observe(time.perf_counter() - start)


def rpc(method):
    """For unary and client-streaming methods."""

    @functools.wraps(method)
    def wrapper(self: ShardServicer, request, context):
        with _served(self, method.__name__, context):
            return method(self, request, context)

    return wrapper


def stream_rpc(method):
    """For server-streaming methods (generators)."""

    @functools.wraps(method)
    def wrapper(self: ShardServicer, request, context):
        with _served(self, method.__name__, context):
            yield from method(self, request, context)

    return wrapper


@dataclass
class Framed:
    """A hot request as `wire.decode` left it: small fields parsed, tensors as views into the buffer."""

    msg: Message
    tensors: dict[int, wire.TensorView]
    error: str | None = None

    def tensor(self, name: str, required: bool = True) -> torch.Tensor | None:
        field = self.msg.DESCRIPTOR.fields_by_name[name].number
        view = self.tensors.get(field)
        if view is None:
            if required:
                raise invalid(f"{name}: missing")
            return None
        return codec.decode(view, name)


def framed_parser(message_type: type[Message], *tensor_fields: str):
    fields = frozenset(message_type.DESCRIPTOR.fields_by_name[f].number for f in tensor_fields)

    def parse(raw: bytes) -> Framed:
        try:
            msg, tensors = wire.decode(raw, message_type, fields)
        except (DecodeError, ValueError, IndexError, TypeError) as e:  # INVALID_ARGUMENT from the handler
            return Framed(message_type(), {}, f"malformed {message_type.DESCRIPTOR.name}: {e}")
        return Framed(msg, tensors)

    return parse


def serialize_response(resp: Message | bytes) -> bytes:
    return resp if isinstance(resp, bytes) else resp.SerializeToString()


class ShardServicer(embedding_shard_pb2_grpc.EmbeddingShardServicer):
    def __init__(self, config: ShardConfig, metrics: ShardMetrics | None = None, *, rejects: Rejects | None = None,
                 peer_token: str | None = None) -> None:
        self.config = config
        self.metrics = metrics or ShardMetrics()
        self.rejects = rejects or Rejects(self.metrics.registry, log)
        self.peer_token = peer_token  # presented to peer shards' ExportRows during PullRows
        self.checkpoint_root = ensure_root(config.checkpoint_root, "checkpoint_root")
        self.publisher: DeltaPublisher | None = None
        if config.publish_deltas is not None:
            self.publisher = DeltaPublisher(config.publish_deltas, config.assignment.shard_id, self._published_rows,
                                            self.metrics.registry)
        self._go_live(config.assignment, ShardTables(config.assignment, device=config.device, seed=config.seed,
                                                     clamp_ids=config.clamp_ids), applied_step=-1)
        self.staged: Staged | None = None
        self._reshard = threading.Lock()  # one Prepare / Commit / Abort at a time
        # Membership fencing: raises (protos.member_agent.Fenced) once the coordinator replaced this shard;
        # None when the shard runs without a coordinator.
        self.member_check: Callable[[], None] | None = None
        # Trainer fencing: the highest epoch seen per trainer id; a lower one is an earlier incarnation.
        self.trainer_epochs: dict[int, int] = {}
        self._epochs_lock = threading.Lock()
        self._inflight = 0  # Lookup/Update requests inside the handlers (bounded by max_inflight_lookups)
        self._inflight_lock = threading.Lock()

    def _go_live(self, assignment: common_pb2.ShardAssignment, tables: ShardTables, applied_step: int) -> None:
        """Serves `tables` under `assignment`'s plan version from now on (start, and every Commit)."""
        steps = StepScheduler(tables, self.config.mode, self.config.num_trainers, self.config.staleness,
                              self.config.handle_ttl_s, self.config.wait_timeout_s, self.config.max_pending_handles)
        steps.applied_step = applied_step
        tables.on_compute = lambda phase, seconds: self.metrics.compute.labels(phase).observe(seconds)
        self.tables, self.steps, self.assignment = tables, steps, assignment
        self.plan_version = assignment.plan_version
        if self.publisher is not None:
            self.publisher.set_slices(self.plan_version, [
                SliceRows(i, sl.table, sl.row_offset, sl.col_offset) for i, sl in enumerate(assignment.slices)],
                applied_step)
            steps.on_applied = self._record_applied
        self.metrics.weight_bytes.set(tables.weight_bytes)
        self.metrics.optimizer_bytes.set(tables.optimizer_bytes)
        self.metrics.plan_version.set(self.plan_version)
        self.metrics.applied_step.set(applied_step)

    def _record_applied(self, group: StepGroup) -> None:
        """The ids an applied step changed, per slice, for the delta publisher (under the step lock)."""
        touched = []
        for batch in group.batches.values():
            for k, slot in enumerate(batch.slots):
                touched.append((slot.slice_index, batch.values[batch.value_offsets[k] : batch.value_offsets[k + 1]]))
        self.publisher.record(touched)

    def _published_rows(self, plan_version: int, index: int, ids: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """Current rows of a slice at an applied-step boundary, unless the plan changed since `plan_version`."""
        with self.steps.cond:
            if plan_version != self.plan_version:
                return None
            rows = self.tables.slice_at(index).weights.index_select(0, ids.to(self.tables.device)).float().cpu()
            return self.steps.applied_step, rows

    @contextlib.contextmanager
    def _admitted(self, method: str) -> Iterator[None]:
        """Bounds the lookups inside the shard: in async mode a lookup may wait for its trainer's earlier
        update (sync: for the other trainers), and each waiting one holds a worker thread and its decoded ids."""
        bound = self.config.max_inflight_lookups
        with self._inflight_lock:
            if self._inflight >= bound:
                raise ShardError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"max_inflight_lookups: {self._inflight} Lookup requests already in flight "
                                 f"(bound {bound}); {method} refused, retry later")
            self._inflight += 1
        self.metrics.inflight_requests.set(self._inflight)
        try:
            yield
        finally:
            with self._inflight_lock:
                self._inflight -= 1
            self.metrics.inflight_requests.set(self._inflight)

    def _check_writable(self, method: str) -> None:
        """A replaced shard (its membership epoch superseded) applies no write: FAILED_PRECONDITION."""
        if self.member_check is None:
            return
        try:
            self.member_check()
        except RuntimeError as e:  # protos.member_agent.Fenced
            raise precondition(f"{method}: shard {self.assignment.shard_id} {e}") from None

    def _check_trainer_epoch(self, trainer: int, epoch: int) -> None:
        """A trainer of an earlier incarnation (its epoch lower than one already seen for its id) is refused;
        epoch 0 (a client without epochs) is accepted as before."""
        if not epoch:
            return
        with self._epochs_lock:
            latest = self.trainer_epochs.get(trainer, 0)
        if epoch < latest:
            raise precondition(f"trainer_epoch: trainer {trainer} epoch {epoch} was superseded by epoch "
                               f"{latest}; a trainer of an earlier incarnation must not write")

    def _saw_trainer_epoch(self, trainer: int, epoch: int) -> None:
        """Recorded only once a request succeeded (bad input changes nothing), for trainer ids in range
        (the map stays bounded by num_trainers)."""
        if epoch and 0 <= trainer < self.config.num_trainers:
            with self._epochs_lock:
                self.trainer_epochs[trainer] = max(epoch, self.trainer_epochs.get(trainer, 0))

    def _check_version(self, version: int) -> None:
        if version != self.plan_version:
            raise precondition(f"plan_version {version} does not match this shard's plan version {self.plan_version}")

    # -- training path ------------------------------------------------------------------------
    def _undecodable(self, method: str, framed: Framed) -> None:
        if framed.error:
            self.rejects.reject(f"/{_SERVICE}/{method}", UNDECODABLE, framed.error)
            raise invalid(framed.error)

    def _directory(self, name: str) -> Path:
        """The request's `directory` resolved under the checkpoint root (INVALID_ARGUMENT if it escapes)."""
        return confine(self.checkpoint_root, name, "directory", what="checkpoint root")

    @rpc
    def Lookup(self, framed: Framed, context) -> bytes:
        with self._admitted("Lookup"):
            return self._lookup(framed)

    def _lookup(self, framed: Framed) -> bytes:
        self._undecodable("Lookup", framed)
        request: embedding_shard_pb2.LookupRequest = framed.msg
        self._check_version(request.plan_version)
        if not request.no_grad:  # a lookup with a handle is the first half of a write
            self._check_writable("Lookup")
            self._check_trainer_epoch(request.trainer_id, request.trainer_epoch)
        out_dtype = _WIRE_OUT.get(request.output_dtype)
        if out_dtype is None:
            raise invalid(f"output_dtype: {request.output_dtype} is not FLOAT32, FLOAT16 or BFLOAT16")
        refs = [(f.feature, f.slice if f.HasField("slice") else None) for f in request.features]
        batch = self.tables.prepare(refs, request.batch_size, framed.tensor("lengths"), framed.tensor("values"),
                                    framed.tensor("weights", required=False))
        handle, emb = self.steps.lookup(batch, request.trainer_id, request.step, request.no_grad)
        if not request.no_grad:
            self._saw_trainer_epoch(request.trainer_id, request.trainer_epoch)
        self.metrics.rows_looked_up.inc(batch.num_ids)
        self.metrics.pending_handles.set(len(self.steps.handles))
        resp = embedding_shard_pb2.LookupResponse(handle=handle, dims=batch.dims)
        return wire.encode(resp, {_EMBEDDINGS_FIELD: emb.detach().to(out_dtype)})

    @rpc
    def Update(self, framed: Framed, context) -> embedding_shard_pb2.UpdateResponse:
        self._undecodable("Update", framed)
        request: embedding_shard_pb2.UpdateRequest = framed.msg
        self._check_version(request.plan_version)
        self._check_writable("Update")
        handle = self.steps.handle(request.handle)
        self._check_trainer_epoch(handle.trainer, request.trainer_epoch)
        grad = self.tables.check_grad(framed.tensor("grad"), handle.batch)
        step, merged = self.steps.update(request.handle, grad)
        self._saw_trainer_epoch(handle.trainer, request.trainer_epoch)
        self.metrics.rows_updated.inc(handle.batch.num_ids)
        self.metrics.pending_handles.set(len(self.steps.handles))
        self.metrics.applied_step.set(self.steps.applied_step)
        return embedding_shard_pb2.UpdateResponse(applied_step=step, merged_trainers=merged)

    @rpc
    def LookupRows(self, request: embedding_shard_pb2.LookupRowsRequest, context):
        self._check_version(request.plan_version)
        ref = request.table
        sl = self.tables.slice_for_table(ref.feature, ref.slice if ref.HasField("slice") else None)
        ids = codec.decode(request.ids, "ids")
        with self.steps.cond:
            rows = self.tables.lookup_rows(sl, ids)
        return embedding_shard_pb2.LookupRowsResponse(rows=codec.encode(rows))

    # -- state --------------------------------------------------------------------------------
    @rpc
    def Checkpoint(self, request: embedding_shard_pb2.CheckpointRequest, context):
        self._check_version(request.plan_version)
        self._check_writable("Checkpoint")
        directory = self._directory(request.directory)
        failpoints.hit("shard.checkpoint")
        with self.steps.cond:
            if self.steps.handles:
                log.warning("checkpoint with %d lookups awaiting updates; it holds the applied state",
                            len(self.steps.handles))
            try:
                res = checkpoint.save(self.tables, directory, shard_id=self.assignment.shard_id,
                                      plan_version=self.plan_version, step=request.step)
            except OSError as e:  # save removed what it wrote: the previous checkpoint stands
                raise status_of_oserror(e, "directory", request.directory) from None
        log.info("checkpoint of step %d to %s (%d bytes)", request.step, request.directory, res.bytes_written)
        return embedding_shard_pb2.CheckpointResponse(manifest_path=str(res.manifest_path),
                                                      bytes_written=res.bytes_written)

    @rpc
    def Restore(self, request: embedding_shard_pb2.RestoreRequest, context):
        self._check_version(request.plan_version)
        self._check_writable("Restore")
        directory = self._directory(request.directory)
        try:
            loaded = checkpoint.load_verified(self.tables, directory)  # verified before touching state
        except OSError as e:
            raise status_of_oserror(e, "directory", request.directory) from None
        with self.steps.cond:
            checkpoint.apply(self.tables, loaded)
            self.steps.reset(loaded.step)
            if self.publisher is not None:  # rows went back in time: followers must reload a snapshot
                self.publisher.rewind(loaded.step)
        log.info("restored step %d from %s", loaded.step, request.directory)
        return embedding_shard_pb2.RestoreResponse(step=loaded.step, bytes_read=loaded.bytes_read)

    @stream_rpc
    def ExportRows(self, request: embedding_shard_pb2.ExportRowsRequest,
                   context) -> Iterator[embedding_shard_pb2.RowChunk]:
        self._check_version(request.plan_version)
        sl = self.tables.slice_at(request.slice)
        start, end = request.row_start, request.row_end
        if not 0 <= start < end <= sl.slice.num_rows:
            raise invalid(f"row_start/row_end: [{start}, {end}) is not a non-empty range inside slice "
                          f"{sl.index} of table {sl.table.name!r} [0, {sl.slice.num_rows})")
        row_bytes = sl.weights.shape[1] * 4 + sum(s[0].numel() * 4 for s in sl.states)
        chunk = request.chunk_rows or max(1, self.config.export_chunk_bytes // row_bytes)
        for r0 in range(start, end, chunk):
            r1 = min(r0 + chunk, end)
            if request.crc32:  # framed by hand: one copy, straight from the live rows, under the lock
                with self.steps.cond:
                    parts = [sl.weights[r0:r1].detach().cpu(), *(s[r0:r1].detach().cpu() for s in sl.states)]
                    head = embedding_shard_pb2.RowChunk(plan_version=self.plan_version, table=sl.table.name,
                                                        slice=sl.index, row_start=r0, crc32=tensors_crc32(parts))
                    yield wire.encode(head, [(_WEIGHTS_FIELD, parts[0]), *((_STATE_FIELD, s) for s in parts[1:])])
                continue
            with self.steps.cond:
                w = sl.weights[r0:r1].detach().cpu().clone()
                states = [s[r0:r1].detach().cpu().clone() for s in sl.states]
            msg = embedding_shard_pb2.RowChunk(plan_version=self.plan_version, table=sl.table.name,
                                               slice=sl.index, row_start=r0)
            codec.encode(w, msg.weights)
            for s in states:
                codec.encode(s, msg.optimizer_state.add())
            msg.sha256 = chunk_digest(msg)
            yield msg

    @rpc
    def ImportRows(self, request_iterator: Iterator[embedding_shard_pb2.RowChunk], context):
        self._check_writable("ImportRows")
        staged = []
        rows = 0
        sl = None
        for i, chunk in enumerate(request_iterator):
            self._check_version(chunk.plan_version)
            if sl is None:
                sl = self.tables.slice_at(chunk.slice)
            if chunk.slice != sl.index or chunk.table != sl.table.name:
                raise invalid(f"chunk {i}: table {chunk.table!r} slice {chunk.slice} differs from the first chunk's "
                              f"table {sl.table.name!r} slice {sl.index}")
            verify_chunk(chunk, i)
            w = codec.decode(chunk.weights, f"chunk {i} weights")
            states = [codec.decode(s, f"chunk {i} optimizer_state[{k}]") for k, s in enumerate(chunk.optimizer_state)]
            self.tables.check_rows(sl, chunk.row_start, w, states)
            staged.append((chunk.row_start, w, states))
            rows += w.shape[0]
        if sl is None:
            raise invalid("ImportRows: empty stream")
        with self.steps.cond:  # every chunk verified: apply all or nothing
            for row_start, w, states in staged:
                self.tables.write_rows(sl, row_start, w, states)
        log.info("imported %d rows into table %s slice %d", rows, sl.table.name, sl.index)
        return embedding_shard_pb2.ImportRowsResponse(rows=rows, chunks=len(staged))

    @rpc
    def Info(self, request, context) -> embedding_shard_pb2.InfoResponse:
        c = self.steps.counters
        resp = embedding_shard_pb2.InfoResponse(
            shard_id=self.assignment.shard_id, plan_version=self.plan_version, device=str(self.tables.device),
            mode=self.config.mode.value, num_trainers=self.config.num_trainers,
            weight_bytes=self.tables.weight_bytes, optimizer_bytes=self.tables.optimizer_bytes,
            resident_bytes=resident_bytes(), lookups=c.lookups, updates=c.updates,
            rows_looked_up=c.rows_looked_up, rows_updated=c.rows_updated, applied_step=self.steps.applied_step,
            staged_version=self.staged.assignment.plan_version if self.staged else 0)
        for sl in self.tables.slices:
            resp.slices.add(index=sl.index, slice=sl.slice, features=sl.features,
                            weight_bytes=sl.weights.numel() * 4,
                            optimizer_bytes=sum(s.numel() * s.element_size() for s in sl.states),
                            optimizer=sl.optimizer_name)
        return resp

    # -- re-sharding --------------------------------------------------------------------------
    @rpc
    def Prepare(self, request: embedding_shard_pb2.PrepareRequest, context) -> embedding_shard_pb2.PrepareResponse:
        self._check_writable("Prepare")
        if self.config.collective_rank is not None:
            raise precondition("Prepare: this shard serves the collective transport; re-sharding needs gRPC")
        staged = stage(request.assignment, self.plan_version, self.assignment.shard_id, device=self.config.device,
                       seed=self.config.seed, clamp_ids=self.config.clamp_ids)
        with self._reshard:
            self.staged = staged  # replaces an earlier staged plan (a retried rollout)
        return embedding_shard_pb2.PrepareResponse(weight_bytes=staged.tables.weight_bytes,
                                                   optimizer_bytes=staged.tables.optimizer_bytes)

    def _staged(self, version: int) -> Staged:
        staged = self.staged
        if staged is None or staged.assignment.plan_version != version:
            have = staged.assignment.plan_version if staged else "none"
            raise precondition(f"plan_version {version}: not staged here (staged: {have}); call Prepare first")
        return staged

    @rpc
    def PullRows(self, request: embedding_shard_pb2.PullRowsRequest, context) -> embedding_shard_pb2.PullRowsResponse:
        self._check_writable("PullRows")
        staged = self._staged(request.plan_version)
        dest = staged.tables.slice_at(request.dest_slice)
        if request.source:
            res = pull_remote(request, staged.tables, dest, self.config.server.max_message_bytes, self.config.tls_ca,
                              token=self.peer_token, tls_cert=self.config.server.tls_cert,
                              tls_key=self.config.server.tls_key)
        else:
            self._check_version(request.source_plan_version)
            with self.steps.cond:
                res = pull_local(request, self.tables, staged.tables, dest)
        self.metrics.rows_migrated.inc(res.rows)
        self.metrics.bytes_migrated.inc(res.bytes)
        return embedding_shard_pb2.PullRowsResponse(rows=res.rows, chunks=res.chunks, bytes=res.bytes,
                                                    sha256=res.sha256)

    @rpc
    def Commit(self, request: embedding_shard_pb2.CommitRequest, context) -> embedding_shard_pb2.CommitResponse:
        self._check_writable("Commit")
        with self._reshard:
            if request.plan_version == self.plan_version and self.staged is None:
                return embedding_shard_pb2.CommitResponse(plan_version=self.plan_version)  # a retried commit
            staged = self._staged(request.plan_version)
            if self.publisher is not None:  # the old plan's last rows go out before its slices do
                self.publisher.flush()
            old = self.steps
            with old.cond:  # no request is inside the old tables while they are swapped out
                self._go_live(staged.assignment, staged.tables, request.applied_step)
                self.staged = None
                old.shutdown()  # anything still waiting on the old plan fails (UNAVAILABLE) instead of hanging
        log.info("plan version %d live: %d slices, next step %d", self.plan_version, len(self.assignment.slices),
                 request.applied_step + 1)
        return embedding_shard_pb2.CommitResponse(plan_version=self.plan_version)

    @rpc
    def Abort(self, request: embedding_shard_pb2.AbortRequest, context) -> embedding_shard_pb2.AbortResponse:
        with self._reshard:
            staged = self.staged
            dropped = staged is not None and staged.assignment.plan_version == request.plan_version
            if dropped:
                self.staged = None
        if dropped:
            log.info("dropped staged plan version %d", request.plan_version)
        return embedding_shard_pb2.AbortResponse(dropped=dropped)


def add_to_server(servicer: ShardServicer, server: grpc.Server) -> None:
    """Registers the service; Lookup and Update use the copy-free framing of `protos.wire`."""
    pb = embedding_shard_pb2

    def std(fn, req, resp, kind=grpc.unary_unary_rpc_method_handler):
        return kind(fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString)

    handlers = {
        "Lookup": grpc.unary_unary_rpc_method_handler(
            servicer.Lookup, request_deserializer=framed_parser(pb.LookupRequest, "lengths", "values", "weights"),
            response_serializer=serialize_response),
        "Update": grpc.unary_unary_rpc_method_handler(
            servicer.Update, request_deserializer=framed_parser(pb.UpdateRequest, "grad"),
            response_serializer=pb.UpdateResponse.SerializeToString),
        "LookupRows": std(servicer.LookupRows, pb.LookupRowsRequest, pb.LookupRowsResponse),
        "Checkpoint": std(servicer.Checkpoint, pb.CheckpointRequest, pb.CheckpointResponse),
        "Restore": std(servicer.Restore, pb.RestoreRequest, pb.RestoreResponse),
        "ExportRows": grpc.unary_stream_rpc_method_handler(
            servicer.ExportRows, request_deserializer=pb.ExportRowsRequest.FromString,
            response_serializer=serialize_response),
        "ImportRows": std(servicer.ImportRows, pb.RowChunk, pb.ImportRowsResponse,
                          grpc.stream_unary_rpc_method_handler),
        "Info": std(servicer.Info, pb.InfoRequest, pb.InfoResponse),
        "Prepare": std(servicer.Prepare, pb.PrepareRequest, pb.PrepareResponse),
        "PullRows": std(servicer.PullRows, pb.PullRowsRequest, pb.PullRowsResponse),
        "Commit": std(servicer.Commit, pb.CommitRequest, pb.CommitResponse),
        "Abort": std(servicer.Abort, pb.AbortRequest, pb.AbortResponse),
    }
    name = pb.DESCRIPTOR.services_by_name["EmbeddingShard"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
