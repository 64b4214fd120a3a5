"""Tensor <-> `Tensor` proto: raw little-endian bytes in, `torch.frombuffer` out, no per-element fields."""

from __future__ import annotations

import sys
import warnings

import torch

from protos import common_pb2

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("the tensor codec assumes a little-endian host")

_TO_TORCH: dict[int, torch.dtype] = {
    common_pb2.FLOAT32: torch.float32,
    common_pb2.FLOAT16: torch.float16,
    common_pb2.BFLOAT16: torch.bfloat16,
    common_pb2.INT64: torch.int64,
    common_pb2.INT32: torch.int32,
    common_pb2.UINT8: torch.uint8,
    common_pb2.INT8: torch.int8,
}
_TO_PROTO: dict[torch.dtype, int] = {v: k for k, v in _TO_TORCH.items()}


class CodecError(ValueError):
    """A Tensor message that cannot be decoded; the message names the field."""


def torch_dtype(dtype: int) -> torch.dtype:
    try:
        return _TO_TORCH[dtype]
    except KeyError:
        raise CodecError(f"unsupported dtype {dtype}") from None


def proto_dtype(dtype: torch.dtype) -> int:
    try:
        return _TO_PROTO[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} has no wire encoding") from None


def tensor_bytes(t: torch.Tensor) -> bytes:
    """One copy: the contiguous CPU storage into an immutable bytes object."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the same bits
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def encode(t: torch.Tensor, out: common_pb2.Tensor | None = None) -> common_pb2.Tensor:
    msg = out if out is not None else common_pb2.Tensor()
    msg.dtype = proto_dtype(t.dtype)
    msg.shape[:] = list(t.shape)
    msg.data = tensor_bytes(t)
    return msg


def decode(msg: common_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    """Zero-copy view over the message's bytes (read-only; callers that write must clone)."""
    dtype = _TO_TORCH.get(msg.dtype)
    if dtype is None:
        raise CodecError(f"{field}: unsupported dtype {msg.dtype}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"{field}: negative dimension in shape {list(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = msg.data  # upb copies a bytes field on every access: read it once
    if len(data) != numel * itemsize:
        raise CodecError(
            f"{field}: {len(data)} bytes do not match shape {list(shape)} of {dtype} "
            f"({numel * itemsize} bytes expected)"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bytes are immutable: the view is read-only
        flat = torch.frombuffer(data, dtype=dtype, count=numel)
    return flat.view(shape)
