"""The shard's table slices in fbgemm TBE modules, and the batched lookup/backward over them.

Slices that share an optimizer config and pooling mode live in ONE
`SplitTableBatchedEmbeddingBagsCodegen` (normally all of them), so a request for many features is one
kernel call. Each TBE "feature" is a whole slice (identity `feature_table_map`): when several features
look up one table, the batch is widened instead (feature j of a table uses bags [j*B, (j+1)*B)). That
is the same math as a shared table in one TBE, and it avoids fbgemm's CPU row-wise Adagrad bug with
shared tables (see DESIGN.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    BoundsCheckMode,
    EmbeddingLocation,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

from embedding_service.errors import invalid, precondition
from protos import common_pb2
from protos.table_init import initial_rows

log = logging.getLogger(__name__)

_OPTIMIZERS = {
    0: EmbOptimType.EXACT_SGD,
    common_pb2.EXACT_SGD: EmbOptimType.EXACT_SGD,
    common_pb2.EXACT_ADAGRAD: EmbOptimType.EXACT_ADAGRAD,
    common_pb2.EXACT_ROWWISE_ADAGRAD: EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    common_pb2.ADAM: EmbOptimType.ADAM,
    common_pb2.PARTIAL_ROWWISE_ADAM: EmbOptimType.PARTIAL_ROWWISE_ADAM,
    common_pb2.LAMB: EmbOptimType.LAMB,
}
_POOLING = {0: PoolingMode.SUM, common_pb2.SUM: PoolingMode.SUM, common_pb2.MEAN: PoolingMode.MEAN}


@dataclass(frozen=True)
class FeatureSlot:
    """Where one (feature, slice) lands: group, TBE table position, replica (bag block), columns."""

    feature: str
    table: str
    slice_index: int
    group: int
    position: int
    replica: int
    dim: int
    num_rows: int
    pooling: int


@dataclass
class SliceState:
    index: int
    table: common_pb2.TableConfig
    slice: common_pb2.TableSlice
    group: int
    position: int
    features: list[str]
    weights: torch.Tensor  # view into the TBE's weights
    states: list[torch.Tensor]  # views into the TBE's optimizer state ([rows] or [rows, dim])

    @property
    def optimizer_name(self) -> str:
        return common_pb2.OptimizerType.Name(self.table.optimizer.type or common_pb2.EXACT_SGD)


@dataclass
class TBEGroup:
    tbe: SplitTableBatchedEmbeddingBagsCodegen
    slices: list[int]  # slice indices in TBE table order
    col_offsets: list[int]  # column of each TBE table in the pooled output
    total_dim: int
    replicas: int  # most features of one slice
    pooling: PoolingMode


@dataclass
class PreparedBatch:
    """A validated lookup: ids per feature, still as the request laid them out (feature-major)."""

    slots: list[FeatureSlot]
    batch_size: int
    lengths: torch.Tensor  # [F, B] int64
    values: torch.Tensor  # flat ids, int32 or int64
    weights: torch.Tensor | None
    value_offsets: list[int]  # F + 1 boundaries into values

    @property
    def dims(self) -> list[int]:
        return [s.dim for s in self.slots]

    @property
    def num_ids(self) -> int:
        return int(self.values.numel())


@dataclass
class ForwardResult:
    """Pooled outputs of one TBE forward over one or more batches (sync mode concatenates trainers)."""

    batches: list[PreparedBatch]
    outputs: dict[int, torch.Tensor]  # group -> [replicas * B_total, total_dim], with autograd
    batch_offsets: list[int]
    total_batch: int
    fast: bool = False
    embeddings: list[torch.Tensor] = field(default_factory=list)  # per batch [B_i, sum d]


class ShardTables:
    """Owns the TBE modules of one shard and the mapping from features to them."""

    def __init__(self, assignment: common_pb2.ShardAssignment, device: str = "cpu", seed: int = 0,
                 clamp_ids: bool = False) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda requested but torch.cuda.is_available() is False")
        self.clamp_ids = clamp_ids
        self.seed = seed
        self.on_compute: Callable[[str, float], None] | None = None  # (phase, seconds) for metrics
        self.tables = {t.name: t for t in assignment.tables}
        self.slices: list[SliceState] = []
        self.groups: list[TBEGroup] = []
        self._slots: dict[str, list[FeatureSlot]] = {}
        self._table_slices: dict[str, list[int]] = {}
        self._build(assignment)

    # -- construction -------------------------------------------------------------------------
    def _build(self, assignment: common_pb2.ShardAssignment) -> None:
        by_key: dict[tuple, list[int]] = {}
        for i, s in enumerate(assignment.slices):
            t = self.tables[s.table]
            o = t.optimizer
            key = (o.type or common_pb2.EXACT_SGD, o.learning_rate, o.eps, o.weight_decay, o.beta1, o.beta2,
                   t.pooling or common_pb2.SUM)
            by_key.setdefault(key, []).append(i)
            self._table_slices.setdefault(s.table, []).append(i)
        placements: dict[int, tuple[int, int]] = {}
        for g, (key, idxs) in enumerate(by_key.items()):
            opt_type, lr, eps, wd, b1, b2, pooling = key
            if self.device.type == "cuda":
                loc, comp = EmbeddingLocation.DEVICE, ComputeDevice.CUDA
            else:
                loc, comp = EmbeddingLocation.HOST, ComputeDevice.CPU
            specs = [(assignment.slices[i].num_rows, assignment.slices[i].num_cols, loc, comp) for i in idxs]
            kwargs = dict(optimizer=_OPTIMIZERS[opt_type], learning_rate=lr, weight_decay=wd,
                          pooling_mode=_POOLING[pooling], bounds_check_mode=BoundsCheckMode.NONE,
                          device=self.device)
            if eps:
                kwargs["eps"] = eps
            if b1:
                kwargs["beta1"] = b1
            if b2:
                kwargs["beta2"] = b2
            if wd:
                kwargs["weight_decay_mode"] = WeightDecayMode.L2
            try:
                tbe = SplitTableBatchedEmbeddingBagsCodegen(specs, **kwargs)
            except AssertionError as e:  # fbgemm refuses unsupported optimizer/device pairs this way
                raise ValueError(f"tables {[assignment.slices[i].table for i in idxs]}: {e}") from None
            cols, acc = [], 0
            for i in idxs:
                cols.append(acc)
                acc += assignment.slices[i].num_cols
            replicas = max(len(self.tables[assignment.slices[i].table].features) for i in idxs)
            self.groups.append(TBEGroup(tbe, list(idxs), cols, acc, replicas, _POOLING[pooling]))
            for pos, i in enumerate(idxs):
                placements[i] = (g, pos)
        for i, s in enumerate(assignment.slices):
            g, pos = placements[i]
            tbe = self.groups[g].tbe
            t = self.tables[s.table]
            weights = tbe.split_embedding_weights()[pos]
            states = list(tbe.split_optimizer_states()[pos]) if _has_state(t) else []
            with torch.no_grad():
                weights.copy_(initial_rows(t, self.seed, s.row_offset, s.row_offset + s.num_rows,
                                           s.col_offset, s.col_offset + s.num_cols))
            self.slices.append(SliceState(i, t, s, g, pos, list(t.features), weights, states))
            for rep, f in enumerate(t.features):
                self._slots.setdefault(f, []).append(
                    FeatureSlot(f, t.name, i, g, pos, rep, s.num_cols, s.num_rows, t.pooling or common_pb2.SUM)
                )

    # -- accounting ---------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return sum(s.weights.numel() * s.weights.element_size() for s in self.slices)

    @property
    def optimizer_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for s in self.slices for x in s.states)

    # -- request resolution -------------------------------------------------------------------
    def resolve(self, feature: str, slice_index: int | None) -> FeatureSlot:
        slots = self._slots.get(feature)
        if slots is None:
            raise invalid(f"unknown feature {feature!r}: this shard serves {sorted(self._slots)}")
        if slice_index is None:
            if len(slots) > 1:
                raise invalid(
                    f"feature {feature!r}: this shard holds {len(slots)} slices of table {slots[0].table!r} "
                    f"(indices {[s.slice_index for s in slots]}); set FeatureRef.slice"
                )
            return slots[0]
        for s in slots:
            if s.slice_index == slice_index:
                return s
        raise invalid(f"feature {feature!r}: slice {slice_index} does not hold table {slots[0].table!r}")

    def slice_for_table(self, name: str, slice_index: int | None) -> SliceState:
        """Resolves a table (or one of its features) to the slice held here."""
        table = name if name in self.tables else None
        if table is None and name in self._slots:
            table = self._slots[name][0].table
        if table is None:
            raise invalid(f"unknown table or feature {name!r}")
        idxs = self._table_slices[table]
        if slice_index is None:
            if len(idxs) > 1:
                raise invalid(f"table {table!r}: {len(idxs)} slices here (indices {idxs}); set the slice index")
            return self.slices[idxs[0]]
        if slice_index not in idxs:
            raise invalid(f"table {table!r}: slice {slice_index} is not one of its slices here ({idxs})")
        return self.slices[slice_index]

    def slice_at(self, index: int) -> SliceState:
        if not 0 <= index < len(self.slices):
            raise invalid(f"slice: index {index} out of range [0, {len(self.slices)})")
        return self.slices[index]

    def prepare(self, refs: list[tuple[str, int | None]], batch_size: int, lengths: torch.Tensor,
                values: torch.Tensor, weights: torch.Tensor | None) -> PreparedBatch:
        """Validates a lookup completely before anything runs; raises INVALID_ARGUMENT naming the field."""
        if not refs:
            raise invalid("features: empty")
        if batch_size <= 0:
            raise invalid(f"batch_size: must be positive, got {batch_size}")
        slots = [self.resolve(f, s) for f, s in refs]
        seen = set()
        for s in slots:
            if (s.feature, s.slice_index) in seen:
                raise invalid(f"features: {s.feature!r} listed twice")
            seen.add((s.feature, s.slice_index))
        n_feat = len(slots)
        if lengths.dtype not in (torch.int32, torch.int64):
            raise invalid(f"lengths: dtype must be INT32 or INT64, got {lengths.dtype}")
        if values.dtype not in (torch.int32, torch.int64):
            raise invalid(f"values: dtype must be INT32 or INT64, got {values.dtype}")
        if lengths.dim() != 1 or lengths.numel() != n_feat * batch_size:
            raise invalid(
                f"lengths: expected {n_feat * batch_size} entries ({n_feat} features x batch {batch_size}), "
                f"got shape {list(lengths.shape)}"
            )
        if values.dim() != 1:
            raise invalid(f"values: expected a 1-D tensor, got shape {list(values.shape)}")
        lengths2d = lengths.view(n_feat, batch_size).to(torch.int64)
        if n_feat * batch_size and int(lengths2d.min()) < 0:
            raise invalid("lengths: negative length")
        if n_feat * batch_size and int(lengths2d.max()) > values.numel():  # before any sum can wrap int64
            raise invalid(f"lengths: an entry exceeds the {values.numel()} ids in values")
        per_feature = lengths2d.sum(dim=1)
        total = int(per_feature.sum())
        if total != values.numel():
            raise invalid(f"lengths add up to {total} ids but values holds {values.numel()}")
        offsets = [0, *torch.cumsum(per_feature, 0).tolist()]
        if weights is not None:
            if weights.dtype != torch.float32 or weights.shape != values.shape:
                raise invalid(
                    f"weights: expected FLOAT32 of shape {list(values.shape)}, got {weights.dtype} "
                    f"{list(weights.shape)}"
                )
            if not bool(torch.isfinite(weights).all()):
                raise invalid("weights: NaN or Inf")
            for k, s in enumerate(slots):
                seg = weights[offsets[k] : offsets[k + 1]]
                if s.pooling != common_pb2.SUM and seg.numel() and not bool((seg == 1).all()):
                    raise invalid(f"weights: feature {s.feature!r} pools MEAN; per-id weights need SUM pooling "
                                  "(send 1.0 for its ids)")
        values = self._check_ids(slots, values, offsets)
        return PreparedBatch(slots, batch_size, lengths2d, values, weights, offsets)

    def _check_ids(self, slots: list[FeatureSlot], values: torch.Tensor, offsets: list[int]) -> torch.Tensor:
        clamped = None
        for k, s in enumerate(slots):
            seg = values[offsets[k] : offsets[k + 1]]
            if seg.numel() == 0:
                continue
            lo, hi = torch.aminmax(seg)
            lo, hi = int(lo), int(hi)
            if lo >= 0 and hi < s.num_rows:
                continue
            if not self.clamp_ids:
                bad = lo if lo < 0 else hi
                raise invalid(
                    f"feature {s.feature!r} (table {s.table!r}, slice {s.slice_index}): id {bad} out of range "
                    f"[0, {s.num_rows})"
                )
            if clamped is None:
                clamped = values.clone()
            clamped[offsets[k] : offsets[k + 1]].clamp_(0, s.num_rows - 1)
        return values if clamped is None else clamped

    def check_grad(self, grad: torch.Tensor, batch: PreparedBatch) -> torch.Tensor:
        """Shape, dtype and finiteness of a gradient; returns it as float32 on the shard's device."""
        want = [batch.batch_size, sum(batch.dims)]
        if grad.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise invalid(f"grad: dtype must be FLOAT32, FLOAT16 or BFLOAT16, got {grad.dtype}")
        if list(grad.shape) != want:
            raise invalid(f"grad: expected shape {want} (batch x sum of feature dims), got {list(grad.shape)}")
        g = grad.to(device=self.device, dtype=torch.float32)
        if not bool(torch.isfinite(g.sum())):  # one cheap reduction; find the culprit only when it fails
            col = 0
            for s in batch.slots:
                if not bool(torch.isfinite(g[:, col : col + s.dim]).all()):
                    raise invalid(f"grad: NaN or Inf in the gradient of feature {s.feature!r}")
                col += s.dim
            raise invalid("grad: sum overflows float32")
        return g

    # -- compute ------------------------------------------------------------------------------
    def forward(self, batches: list[PreparedBatch], requires_grad: bool) -> ForwardResult:
        """One TBE call per group over all batches (concatenated along the batch)."""
        start = time.perf_counter()
        result = self._forward(batches, requires_grad)
        if self.on_compute is not None:
            self.on_compute("forward", time.perf_counter() - start)
        return result

    def backward(self, fwd: ForwardResult, grads: list[torch.Tensor]) -> None:
        """Runs the TBE backward: fbgemm applies the fused optimizer to the touched rows in place."""
        start = time.perf_counter()
        self._backward(fwd, grads)
        if self.on_compute is not None:
            self.on_compute("backward", time.perf_counter() - start)

    def _forward(self, batches: list[PreparedBatch], requires_grad: bool) -> ForwardResult:
        sizes = [b.batch_size for b in batches]
        offs = [0]
        for n in sizes:
            offs.append(offs[-1] + n)
        total_b = offs[-1]
        result = ForwardResult(batches, {}, offs, total_b)
        first = batches[0]
        grad_ctx = torch.enable_grad() if requires_grad else torch.no_grad()
        with grad_ctx:
            if self._is_fast(batches):
                # The request already has the TBE's layout: no regrouping, and each trainer's
                # embeddings are a contiguous row range of the output.
                g = first.slots[0].group
                grp = self.groups[g]
                if len(batches) == 1:
                    values, lengths, weights = first.values, first.lengths.view(-1), first.weights
                else:  # feature-major over the global batch: feature f of every trainer, then f+1
                    idx_dtype = torch.int32 if all(b.values.dtype == torch.int32 for b in batches) else torch.int64
                    values = torch.cat([b.values[b.value_offsets[f] : b.value_offsets[f + 1]].to(idx_dtype)
                                        for f in range(len(first.slots)) for b in batches])
                    lengths = torch.cat([b.lengths for b in batches], dim=1).view(-1)
                    weights = None
                    if any(b.weights is not None for b in batches):
                        weights = torch.cat([
                            (b.weights[b.value_offsets[f] : b.value_offsets[f + 1]] if b.weights is not None
                             else torch.ones(b.value_offsets[f + 1] - b.value_offsets[f]))
                            for f in range(len(first.slots)) for b in batches])
                indices = values.to(self.device)
                lengths = lengths.to(device=self.device, dtype=indices.dtype)
                if grp.pooling != PoolingMode.SUM:
                    weights = None
                out = grp.tbe(indices, torch.ops.fbgemm.asynchronous_complete_cumsum(lengths),
                              per_sample_weights=_to(weights, self.device))
                result.outputs[g] = out
                result.fast = True
                result.embeddings = [out[offs[i] : offs[i + 1]] for i in range(len(batches))]
                return result
            for g in sorted({s.group for s in first.slots}):
                result.outputs[g] = self._group_forward(g, batches, offs, total_b)
            for bi, b in enumerate(batches):
                parts = []
                for s in b.slots:
                    grp = self.groups[s.group]
                    view = result.outputs[s.group].view(grp.replicas, total_b, grp.total_dim)
                    col = grp.col_offsets[s.position]
                    parts.append(view[s.replica, offs[bi] : offs[bi + 1], col : col + s.dim])
                result.embeddings.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        return result

    def _is_fast(self, batches: list[PreparedBatch]) -> bool:
        """Every batch names exactly one group's slices, in TBE order, one feature per slice."""
        slots = batches[0].slots
        grp = self.groups[slots[0].group]
        aligned = (grp.replicas == 1 and len(slots) == len(grp.slices)
                   and all(s.group == slots[0].group and s.position == p for p, s in enumerate(slots)))
        return aligned and all(b.slots == slots for b in batches[1:])

    def _group_forward(self, g: int, batches: list[PreparedBatch], offs: list[int], total_b: int) -> torch.Tensor:
        grp = self.groups[g]
        n_tables = len(grp.slices)
        lengths = torch.zeros(n_tables, grp.replicas, total_b, dtype=torch.int64)
        pieces: dict[tuple[int, int], list[tuple[int, int]]] = {}
        idx_dtype = torch.int32 if all(b.values.dtype == torch.int32 for b in batches) else torch.int64
        weighted = grp.pooling == PoolingMode.SUM and any(b.weights is not None for b in batches)
        for bi, b in enumerate(batches):
            for k, s in enumerate(b.slots):
                if s.group != g:
                    continue
                lengths[s.position, s.replica, offs[bi] : offs[bi + 1]] = b.lengths[k]
                pieces.setdefault((s.position, s.replica), []).append((bi, k))
        vals, wts = [], []
        for key in sorted(pieces):
            for bi, k in pieces[key]:
                b = batches[bi]
                vals.append(b.values[b.value_offsets[k] : b.value_offsets[k + 1]].to(idx_dtype))
                if weighted:
                    if b.weights is None:
                        wts.append(torch.ones(vals[-1].numel()))
                    else:
                        wts.append(b.weights[b.value_offsets[k] : b.value_offsets[k + 1]])
        indices = torch.cat(vals) if vals else torch.empty(0, dtype=idx_dtype)
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.view(-1).to(idx_dtype))
        weights = torch.cat(wts) if weighted else None
        return grp.tbe(indices.to(self.device), offsets.to(self.device),
                       per_sample_weights=_to(weights, self.device))

    def _backward(self, fwd: ForwardResult, grads: list[torch.Tensor]) -> None:
        if fwd.fast:
            grad = grads[0] if len(grads) == 1 else torch.cat(grads)
            torch.autograd.backward([fwd.outputs[next(iter(fwd.outputs))]], [grad])
            return
        group_grads = {}
        for g, out in fwd.outputs.items():
            grp = self.groups[g]
            gg = torch.zeros(grp.replicas, fwd.total_batch, grp.total_dim, device=self.device)
            for bi, b in enumerate(fwd.batches):
                col_in = 0
                for s in b.slots:
                    if s.group == g:
                        col = grp.col_offsets[s.position]
                        gg[s.replica, fwd.batch_offsets[bi] : fwd.batch_offsets[bi + 1], col : col + s.dim] = (
                            grads[bi][:, col_in : col_in + s.dim]
                        )
                    col_in += s.dim
            group_grads[g] = gg.view(out.shape)
        keys = list(fwd.outputs)
        torch.autograd.backward([fwd.outputs[g] for g in keys], [group_grads[g] for g in keys])

    def lookup_rows(self, sl: SliceState, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1:
            raise invalid(f"ids: expected a 1-D INT32/INT64 tensor, got {ids.dtype} {list(ids.shape)}")
        if ids.numel():
            lo, hi = (int(x) for x in torch.aminmax(ids))
            if lo < 0 or hi >= sl.slice.num_rows:
                bad = lo if lo < 0 else hi
                raise invalid(f"table {sl.table.name!r} (slice {sl.index}): id {bad} out of range "
                              f"[0, {sl.slice.num_rows})")
        return sl.weights.index_select(0, ids.to(device=sl.weights.device, dtype=torch.int64)).cpu()

    def write_rows(self, sl: SliceState, row_start: int, weights: torch.Tensor, states: list[torch.Tensor]) -> None:
        """Copies rows (and their optimizer state) into a slice; shapes were checked by the caller."""
        n = weights.shape[0]
        with torch.no_grad():
            sl.weights[row_start : row_start + n].copy_(weights)
            for live, new in zip(sl.states, states, strict=True):
                live[row_start : row_start + n].copy_(new.view(live[row_start : row_start + n].shape))

    def write_block(self, sl: SliceState, row_start: int, col_start: int, weights: torch.Tensor,
                    states: list[torch.Tensor], check_finite: bool = True) -> None:
        """Copies a rectangle of rows into a slice (re-sharding). Element-wise optimizer state follows the
        columns; row-wise state ([rows]) is copied whole, as a column-split TBE would keep it per slice."""
        n, c = weights.shape
        if row_start < 0 or row_start + n > sl.slice.num_rows or col_start < 0 or col_start + c > sl.slice.num_cols:
            raise invalid(f"dest rows [{row_start}, {row_start + n}) cols [{col_start}, {col_start + c}) outside "
                          f"slice {sl.index} of table {sl.table.name!r} [{sl.slice.num_rows} x {sl.slice.num_cols}]")
        if len(states) != len(sl.states):
            raise precondition(f"optimizer_state: table {sl.table.name!r} uses {sl.optimizer_name} with "
                               f"{len(sl.states)} state tensors, got {len(states)}")
        if check_finite and not bool(torch.isfinite(weights).all()):
            raise invalid(f"weights: NaN or Inf in rows for table {sl.table.name!r}")
        with torch.no_grad():
            sl.weights[row_start : row_start + n, col_start : col_start + c].copy_(weights)
            for live, new in zip(sl.states, states, strict=True):
                block = live[row_start : row_start + n]
                if live.dim() == 2:
                    block = block[:, col_start : col_start + c]
                block.copy_(new.reshape(block.shape))

    def check_rows(self, sl: SliceState, row_start: int, weights: torch.Tensor, states: list[torch.Tensor]) -> None:
        n = weights.shape[0] if weights.dim() == 2 else -1
        if weights.dim() != 2 or weights.shape[1] != sl.slice.num_cols or weights.dtype != torch.float32:
            raise invalid(f"weights: expected FLOAT32 [n, {sl.slice.num_cols}] for table {sl.table.name!r}, "
                          f"got {weights.dtype} {list(weights.shape)}")
        if row_start < 0 or row_start + n > sl.slice.num_rows:
            raise invalid(f"row_start: rows [{row_start}, {row_start + n}) outside slice {sl.index} of table "
                          f"{sl.table.name!r} [0, {sl.slice.num_rows})")
        if len(states) != len(sl.states):
            raise precondition(f"optimizer_state: table {sl.table.name!r} uses {sl.optimizer_name} with "
                               f"{len(sl.states)} state tensors, got {len(states)}")
        for k, (live, new) in enumerate(zip(sl.states, states, strict=True)):
            want = [n, *live.shape[1:]]
            if list(new.shape) != want or new.dtype != live.dtype:
                raise precondition(f"optimizer_state[{k}]: expected {live.dtype} {want} for table "
                                   f"{sl.table.name!r}, got {new.dtype} {list(new.shape)}")
        if not bool(torch.isfinite(weights).all()):
            raise invalid(f"weights: NaN or Inf in rows for table {sl.table.name!r}")


def _has_state(t: common_pb2.TableConfig) -> bool:
    return (t.optimizer.type or common_pb2.EXACT_SGD) != common_pb2.EXACT_SGD


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
