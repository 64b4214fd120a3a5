"""Copy-free framing of the hot messages' tensor fields (Lookup, Update).

Protobuf's Python runtime copies a bytes field when it serializes, when it parses, and again when the
field is read. For multi-MB embeddings and gradients those copies cost as much as the TBE kernels, so
the hot RPCs frame their tensors by hand, in standard protobuf wire format (any protobuf peer, e.g.
grpcurl, interoperates):

* encode: the small fields through protobuf, each tensor as a hand-written field header followed by
  its raw bytes, joined once (one copy, straight from the tensor's memory);
* decode: one pass over the top-level fields; tensor fields become `TensorView`s whose `data` is a
  memoryview into the received buffer (no copy), every other field is parsed by protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError, Message

from protos import codec

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5


@dataclass
class TensorView:
    """Duck-types `common_pb2.Tensor` for `codec.decode`; `data` aliases the received message."""

    dtype: int
    shape: list[int]
    data: memoryview


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def tensor_field(field: int, t: torch.Tensor) -> list[bytes | memoryview]:
    """The wire bytes of `Tensor` message field `field` holding `t`, as parts to join."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    data = memoryview(arr).cast("B") if arr.nbytes else b""
    shape = b"".join(_varint(d) for d in t.shape)
    inner = bytes([1 << 3 | _WT_VARINT]) + _varint(codec.proto_dtype(t.dtype))
    if shape:
        inner += bytes([2 << 3 | _WT_LEN]) + _varint(len(shape)) + shape
    inner += bytes([3 << 3 | _WT_LEN]) + _varint(arr.nbytes)
    return [_varint(field << 3 | _WT_LEN) + _varint(len(inner) + arr.nbytes) + inner, data]


def encode(msg: Message, tensors: dict[int, torch.Tensor] | list[tuple[int, torch.Tensor]]) -> bytes:
    """`msg` (tensor fields left unset) plus the tensors, as one serialized message (a list of
    (field, tensor) pairs may repeat a field)."""
    parts: list[bytes | memoryview] = [msg.SerializeToString()]
    for field, t in (tensors.items() if isinstance(tensors, dict) else tensors):
        parts.extend(tensor_field(field, t))
    return b"".join(parts)


def _parse_tensor(buf: memoryview) -> TensorView:
    pos, dtype, shape, data = 0, 0, [], memoryview(b"")
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == _WT_VARINT:
            val, pos = _read_varint(buf, pos)
            if field == 1:
                dtype = val
            elif field == 2:
                shape.append(val)
        elif wt == _WT_LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise DecodeError("truncated tensor field")
            if field == 2:
                sub, p = buf[pos : pos + n], 0
                while p < n:
                    d, p = _read_varint(sub, p)
                    shape.append(d)
            elif field == 3:
                data = buf[pos : pos + n]
            pos += n
        elif wt in (_WT_I64, _WT_I32):
            pos += 8 if wt == _WT_I64 else 4
        else:
            raise DecodeError(f"unsupported wire type {wt} in Tensor")
    # int64 shape entries arrive as unsigned varints: map back to signed (codec rejects negatives)
    shape = [d - (1 << 64) if d >= 1 << 63 else d for d in shape]
    return TensorView(dtype, shape, data)


def decode(raw: bytes, message_type: type[Message], tensor_fields: frozenset[int],
           repeated: frozenset[int] = frozenset()) -> tuple[Message, dict[int, TensorView | list[TensorView]]]:
    """Parses `raw`; tensor fields come back as views into it (a list for `repeated` fields), the rest
    as a `message_type`."""
    buf = memoryview(raw)
    pos, rest, tensors = 0, [], {}
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == _WT_VARINT:
            _, pos = _read_varint(buf, pos)
        elif wt == _WT_LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise DecodeError("truncated length-delimited field")
            if field in repeated:
                tensors.setdefault(field, []).append(_parse_tensor(buf[pos : pos + n]))
                pos += n
                continue
            if field in tensor_fields:
                tensors[field] = _parse_tensor(buf[pos : pos + n])
                pos += n
                continue
            pos += n
        elif wt == _WT_I64:
            pos += 8
        elif wt == _WT_I32:
            pos += 4
        else:
            raise DecodeError(f"unsupported wire type {wt}")
        rest.append(buf[start:pos])
    return message_type.FromString(b"".join(rest)), tensors
