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

if TYPE_CHECKING:  # the Predict proxy of serve-triton validates with a ModelSpec and loads no torch
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
