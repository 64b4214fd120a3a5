"""Decoding and validating one PredictRequest before it may join a batch.

Everything is checked per request (so one bad request never spoils a batch): the dense width and
finiteness, the feature names, lengths that add up, ids inside their tables. A failure is a
RequestError with the gRPC status and a message naming the field; nothing is queued.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np

from protos import common_pb2, inference_pb2

if TYPE_CHECKING:  # the Triton supervisor and its Predict proxy use this module and hold no torch
    from inference_gateway.model import ServingModel

_INT = {common_pb2.INT64: np.int64, common_pb2.INT32: np.int32}


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Limits:
    max_request_samples: int = 4096
    max_request_ids: int = 1 << 20


@dataclass
class Decoded:
    """A valid request in package feature order: dense [B, D] float32, lengths [F, B], values."""

    dense: np.ndarray
    lengths: np.ndarray
    values: np.ndarray
    counts: np.ndarray  # ids per feature [F]

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _array(msg: common_pb2.Tensor, field: str, dtypes: dict[int, type]) -> np.ndarray:
    dtype = dtypes.get(msg.dtype)
    if dtype is None:
        names = [common_pb2.DType.Name(d) for d in dtypes]
        got = common_pb2.DType.Name(msg.dtype) if msg.dtype in common_pb2.DType.values() else str(msg.dtype)
        raise _invalid(f"{field}: dtype {got} is not one of {names}")
    data = msg.data  # upb copies bytes fields on every access: read once
    shape = tuple(msg.shape)
    n = 1
    for d in shape:
        if d < 0:
            raise _invalid(f"{field}: negative dimension in shape {list(shape)}")
        n *= d
    itemsize = np.dtype(dtype).itemsize
    if len(data) != n * itemsize:
        raise _invalid(f"{field}: {len(data)} bytes do not match shape {list(shape)} ({n * itemsize} expected)")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def segment_reorder(values: np.ndarray, seg_lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
    """values laid out as consecutive segments (lengths seg_lengths) -> the segments in `order`."""
    starts = np.zeros(len(seg_lengths), dtype=np.int64)
    np.cumsum(seg_lengths[:-1], out=starts[1:])
    lens = seg_lengths[order]
    total = int(lens.sum())
    out_starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=out_starts[1:])
    idx = np.repeat(starts[order] - out_starts, lens) + np.arange(total, dtype=np.int64)
    return values[idx]


DENSE, IDS = "dense", "ids"
# the compact multi-hot form: `lengths` [B, features] (bag sizes, package feature order) and `values` [B, K]
# (row b: sample b's bags one after another in that order, then padding): 3 inputs a request, any bags
LENGTHS, VALUES = "lengths", "values"
COMPACT = (IDS, LENGTHS, VALUES)  # the compact forms' inputs (single_hot, sample_bags)


def input_names(features: list[str]) -> list[str]:
    """The Open Inference Protocol inputs of a model: `dense`, then lengths and values of each feature."""
    return [DENSE, *(n for f in features for n in (lengths_input(f), values_input(f)))]


def input_set_error(names: set[str] | dict, model: ServingModel) -> str | None:
    """Why a request's set of (known) input names is incomplete, or None: `dense`, then either every
    feature's lengths and values, or `ids` alone (the compact single-hot form), or `lengths` and `values`
    (the compact multi-hot form)."""
    ordered = input_names(model.features)
    if IDS in names:
        both = next((n for n in [*ordered[1:], LENGTHS, VALUES] if n in names), None)
        if both is not None:
            return f"inputs: {both!r} and {IDS!r} (single-hot ids [B, features] replace every lengths and values)"
        ordered = [DENSE, IDS]
    elif LENGTHS in names or VALUES in names:
        both = next((n for n in ordered[1:] if n in names), None)
        if both is not None:
            return (f"inputs: {both!r} and {LENGTHS!r} / {VALUES!r} (the compact form, lengths [B, features] and "
                    "values [B, K], replaces every feature's lengths and values)")
        ordered = [DENSE, LENGTHS, VALUES]
    missing = next((n for n in ordered if n not in names), None)
    if missing is None:
        return None
    return f"inputs: missing input {missing!r} (model {model.name} v{model.version} takes {ordered})"


def single_hot(ids: np.ndarray, nfeat: int, batch: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The compact single-hot form, `ids` [B, features] (one id per feature, package order; 2 inputs a
    request instead of 1 + 2 * features, which costs Triton ~10 us an input) -> feature_bags' result."""
    if ids.shape != (batch, nfeat):
        raise _invalid(f"{IDS}: shape {list(ids.shape)}, expected [{batch}, {nfeat}] (one id per feature per sample, "
                       "in the package's feature order)")
    return np.ones(nfeat * batch, dtype=np.int64), ids.T.astype(np.int64).ravel(), True


def sample_bags(lengths: np.ndarray, values: np.ndarray, nfeat: int, batch: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The compact multi-hot form, `lengths` [B, features] and `values` [B, K] (row b holds sample b's bags
    in package feature order, one after another, then padding; 3 inputs a request instead of
    1 + 2 * features) -> feature_bags' result (feature-major)."""
    if lengths.shape != (batch, nfeat):
        raise _invalid(f"{LENGTHS}: shape {list(lengths.shape)}, expected [{batch}, {nfeat}] (one bag length per "
                       "feature per sample, in the package's feature order)")
    if values.ndim != 2 or values.shape[0] != batch:
        raise _invalid(f"{VALUES}: shape {list(values.shape)}, expected [{batch}, -1] (a row of ids per sample, "
                       f"as {LENGTHS} is [{batch}, {nfeat}])")
    lengths = lengths.astype(np.int64, copy=False)
    if (lengths < 0).any():
        raise _invalid(f"{LENGTHS}: negative entry")
    width = values.shape[1]
    totals = np.minimum(lengths, width + 1).sum(1)  # clipped first: huge entries must not wrap the sum to fit
    over = np.flatnonzero(totals > width)
    if over.size:
        b = int(over[0])
        raise _invalid(f"{LENGTHS}: the bags of sample {b} hold {int(totals[b])} ids, more than the {width} "
                       f"columns of {VALUES}")
    flat = values.ravel() if int(totals.sum()) == values.size else values[np.arange(width) < totals[:, None]]
    feature_major = np.arange(batch * nfeat).reshape(batch, nfeat).T.ravel()
    return (lengths.T.ravel(), segment_reorder(flat.astype(np.int64, copy=False), lengths.ravel(), feature_major),
            True)


def lengths_input(feature: str) -> str:
    """The Open Inference Protocol input of a feature's bag lengths (serve and serve-triton)."""
    return f"{feature}.lengths"


def values_input(feature: str) -> str:
    return f"{feature}.values"


def feature_bags(names: list[tuple[str, str]], lengths: list[np.ndarray], values: list[np.ndarray],
                 batch: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-feature inputs (the Open Inference Protocol's `<feature>.lengths` / `<feature>.values`, names
    as (lengths, values) pairs) -> lengths [F * B] feature-major and values, both int64, for `validate`;
    and whether any feature came in the batched form.

    Two forms per feature: flat, lengths [B] and values [N] (the ids of the B bags one after another);
    or batched, lengths [B, 1] and values [B, K] (row b holds bag b in its first lengths[b] entries, the
    rest is padding and ignored). Triton checks that every input's first dimension is the batch size,
    so a Triton model can only take the batched form; `serve` takes both (benchmarks/gateway_frontend.md)."""
    lens_out, vals_out, batched = [], [], False
    for (ln, vn), lens, vals in zip(names, lengths, values, strict=True):
        if lens.shape == (batch, 1):
            batched = True
            if vals.ndim != 2 or vals.shape[0] != batch:
                raise _invalid(f"{vn}: shape {list(vals.shape)}, expected [{batch}, -1] (a row of ids per sample, "
                               f"as {ln} is [{batch}, 1])")
            lens = lens.reshape(batch).astype(np.int64, copy=False)
            if (lens < 0).any():
                raise _invalid(f"{ln}: negative entry")
            width = vals.shape[1]
            over = np.flatnonzero(lens > width)
            if over.size:
                b = int(over[0])
                raise _invalid(f"{ln}: entry {int(lens[b])} at sample {b} exceeds the {width} columns of {vn}")
            vals = vals[np.arange(width) < lens[:, None]] if int(lens.sum()) != vals.size else vals.ravel()
        elif lens.shape == (batch,):
            if vals.ndim != 1:
                raise _invalid(f"{vn}: expected shape [-1], got {list(vals.shape)}")
            lens = lens.astype(np.int64, copy=False)
            if (lens < 0).any():
                raise _invalid(f"{ln}: negative entry")
            if int(lens.sum()) != vals.size:
                raise _invalid(f"{ln}: add up to {int(lens.sum())} but {vn} holds {vals.size} ids")
        else:
            raise _invalid(f"{ln}: shape {list(lens.shape)}, expected [{batch}] or [{batch}, 1] (one bag length per "
                           "sample of dense)")
        lens_out.append(lens)
        vals_out.append(vals.astype(np.int64, copy=False))
    if not lens_out:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), batched
    return np.concatenate(lens_out), np.concatenate(vals_out), batched


def decode(req: inference_pb2.PredictRequest, model: ServingModel, limits: Limits) -> Decoded:
    dense = _array(req.dense, "dense", {common_pb2.FLOAT32: np.float32})
    return validate(dense, list(req.features), lambda: _array(req.lengths, "lengths", _INT),
                    lambda: _array(req.values, "values", _INT), model, limits)


def validate(dense: np.ndarray, names: list[str], lengths_of: Callable[[], np.ndarray],
             values_of: Callable[[], np.ndarray], model: ServingModel, limits: Limits) -> Decoded:
    """The checks every frontend shares (Predict, ModelInfer): dense [B, D] float32; `names` the order
    of the features in lengths [len(names) * B] feature-major and values (empty: the package's order).
    The sparse arrays are read only once the dense part passed, so errors come in field order."""
    if dense.ndim != 2 or dense.shape[0] == 0:
        raise _invalid(f"dense: expected shape [B >= 1, {model.dense_features}], got {list(dense.shape)}")
    batch, width = dense.shape
    if width != model.dense_features:
        raise _invalid(f"dense: width {width}, model {model.name} v{model.version} takes {model.dense_features}")
    if batch > limits.max_request_samples:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"dense: {batch} samples exceed max_request_samples {limits.max_request_samples}")
    if not np.isfinite(dense).all():
        row, col = np.argwhere(~np.isfinite(dense))[0]
        raise _invalid(f"dense: NaN or Inf at sample {row}, column {col}")
    nfeat = len(model.features)
    order = None
    if names:
        unknown = [n for n in names if n not in model.feature_index]
        if unknown:
            raise _invalid(f"features: unknown feature {unknown[0]!r} (model {model.name} v{model.version} has "
                           f"{model.features})")
        if len(set(names)) != len(names):
            raise _invalid(f"features: duplicate names in {names}")
        missing = [n for n in model.features if n not in set(names)]
        if missing:
            raise _invalid(f"features: missing feature {missing[0]!r}")
        if names != model.features:
            order = np.array([names.index(n) for n in model.features], dtype=np.int64)
    lengths = lengths_of()
    if lengths.ndim != 1 or lengths.size != nfeat * batch:
        raise _invalid(f"lengths: {lengths.size} entries (shape {list(lengths.shape)}), expected "
                       f"len(features) * B = {nfeat} * {batch}")
    values = values_of()
    if values.ndim != 1:
        raise _invalid(f"values: expected 1-D, got shape {list(values.shape)}")
    if values.size > limits.max_request_ids:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"values: {values.size} ids exceed max_request_ids {limits.max_request_ids}")
    lengths = lengths.astype(np.int64, copy=False).reshape(nfeat, batch)
    if (lengths < 0).any():
        raise _invalid("lengths: negative entry")
    if (lengths > values.size).any():  # before any sum: huge entries would wrap int64 and pass the total check
        raise _invalid(f"lengths: an entry exceeds the {values.size} ids in values")
    counts = lengths.sum(axis=1)
    total = int(counts.sum())
    if total != values.size:
        raise _invalid(f"lengths: add up to {total} but values holds {values.size} ids")
    values = values.astype(np.int64, copy=False)
    if order is not None:  # to package order
        values = segment_reorder(values, counts, order)
        lengths, counts = lengths[order], counts[order]
    limit = np.repeat(model.rows_per_feature, counts)
    bad = (values < 0) | (values >= limit)
    if bad.any():
        if model.out_of_range == "zero":  # drop the id: a zero row in a sum
            keep = ~bad
            feature_of = np.repeat(np.arange(nfeat), counts)
            bag_of = np.repeat(np.arange(nfeat * batch), lengths.ravel())
            lengths = np.bincount(bag_of[keep], minlength=nfeat * batch).reshape(nfeat, batch)
            counts = np.bincount(feature_of[keep], minlength=nfeat)
            values = values[keep]
        else:
            i = int(np.argmax(bad))
            f = int(np.searchsorted(np.cumsum(counts), i, side="right"))
            raise _invalid(f"values: id {int(values[i])} of feature {model.features[f]!r} is out of range "
                           f"[0, {int(model.rows_per_feature[f])})")
    return Decoded(dense, lengths, values, counts)
