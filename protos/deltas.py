"""Row deltas on Redis Streams: what a shard publishes after training steps and a gateway applies.

One stream per table (`{namespace}:deltas:{table}`), appended with `XADD ... MAXLEN ~ retention`. An
entry is the latest value of every row a shard's steps changed since its previous entry for that
table (coalesced: the last write of a row wins), read at one applied-step boundary, so a reader that
applies entries in stream order sees each table at one step or a later one. Fields:

    v        format version
    table    table name;  shard  the publishing shard;  pub  its publisher id (new per process)
    seq      per (pub, table), +1 per entry; a publisher that dropped rows skips one, so every reader
             notices the gap and resynchronises from a snapshot
    plan     plan version;  step  the shard's last applied step when the rows were read
    since    the step of this publisher's previous entry for the table (at first: its applied step when
             it began): the entry holds every row changed in steps (since, step]
    at       unix seconds when the oldest change in the entry was applied (the lag counts from here)
    col      first column of the rows (column-wise slices publish their block of columns)
    dtype    "fp32" | "fp16";  n, width  shape of rows
    ids      int64 little-endian global row ids [n];  rows  [n, width] little-endian values
    crc      zlib.crc32 of every other field, so a torn or corrupted entry is refused, never applied
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass

import numpy as np

FORMAT = 1


class DeltaError(ValueError):
    """An entry that does not decode or fails its checksum; the message names the field."""


class DeltaDType(enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def numpy(self) -> np.dtype:
        return np.dtype("<f4") if self is DeltaDType.FP32 else np.dtype("<f2")


def stream_key(namespace: str, table: str) -> str:
    return f"{namespace}:deltas:{table}"


@dataclass(frozen=True)
class RowDelta:
    table: str
    shard: int
    publisher: str
    seq: int
    plan_version: int
    since: int
    step: int
    applied_at: float
    col_offset: int
    ids: np.ndarray  # int64 [n], global row ids of the table
    rows: np.ndarray  # float32 / float16 [n, width]

    @property
    def width(self) -> int:
        return int(self.rows.shape[1])


_HEADER = ("v", "table", "shard", "pub", "seq", "plan", "since", "step", "at", "col", "dtype", "n", "width")


def _crc(fields: dict[bytes, bytes]) -> bytes:
    crc = 0
    for key in sorted(k for k in fields if k != b"crc"):
        crc = zlib.crc32(key, crc)
        crc = zlib.crc32(fields[key], crc)
    return str(crc).encode()


def encode(delta: RowDelta) -> dict[bytes, bytes]:
    """The stream entry's fields for `delta`."""
    ids = np.ascontiguousarray(delta.ids, dtype="<i8")
    rows = np.ascontiguousarray(delta.rows)
    if rows.dtype not in (np.dtype("<f4"), np.dtype("<f2")):
        raise DeltaError(f"rows: dtype {rows.dtype} is not float32 or float16")
    if rows.ndim != 2 or rows.shape[0] != ids.shape[0]:
        raise DeltaError(f"rows: shape {list(rows.shape)} does not match {ids.shape[0]} ids")
    dtype = DeltaDType.FP32 if rows.dtype == np.dtype("<f4") else DeltaDType.FP16
    header = (FORMAT, delta.table, delta.shard, delta.publisher, delta.seq, delta.plan_version, delta.since,
              delta.step,
              repr(float(delta.applied_at)), delta.col_offset, dtype.value, ids.shape[0], rows.shape[1])
    fields = {k.encode(): str(v).encode() for k, v in zip(_HEADER, header, strict=True)}
    fields[b"ids"] = ids.tobytes()
    fields[b"rows"] = rows.tobytes()
    fields[b"crc"] = _crc(fields)
    return fields


def decode(fields: dict[bytes, bytes]) -> RowDelta:
    """Verifies and decodes one entry; DeltaError names what is wrong."""
    missing = [k for k in (*_HEADER, "ids", "rows", "crc") if k.encode() not in fields]
    if missing:
        raise DeltaError(f"delta entry: missing fields {missing}")
    if fields[b"crc"] != _crc(fields):
        raise DeltaError("crc: checksum mismatch (a torn or corrupted entry)")
    text = {k: fields[k.encode()].decode() for k in _HEADER}
    try:
        if int(text["v"]) != FORMAT:
            raise DeltaError(f"v: format {text['v']} is not {FORMAT}")
        dtype = DeltaDType(text["dtype"])
        n, width = int(text["n"]), int(text["width"])
        ids = np.frombuffer(fields[b"ids"], dtype="<i8")
        rows = np.frombuffer(fields[b"rows"], dtype=dtype.numpy)
        if ids.shape[0] != n or rows.shape[0] != n * width:
            raise DeltaError(f"ids/rows: {ids.shape[0]} ids and {rows.shape[0]} values do not make {n} x {width}")
        return RowDelta(table=text["table"], shard=int(text["shard"]), publisher=text["pub"], seq=int(text["seq"]),
                        plan_version=int(text["plan"]), since=int(text["since"]), step=int(text["step"]),
                        applied_at=float(text["at"]),
                        col_offset=int(text["col"]), ids=ids, rows=rows.reshape(n, width))
    except ValueError as e:
        if isinstance(e, DeltaError):
            raise
        raise DeltaError(f"delta entry: {e}") from None


# -- the dense arch -------------------------------------------------------------------------------
# Dense parameters follow at a slower cadence (every N steps): one stream per namespace, `{ns}:dense`, whose
# entries carry the trainer's dense state_dict (torch.save bytes) at a step, checksummed the same way.


def dense_key(namespace: str) -> str:
    return f"{namespace}:dense"


@dataclass(frozen=True)
class DenseDelta:
    step: int
    published_at: float
    state: dict  # parameter / buffer name -> tensor


def encode_dense(step: int, state: dict, published_at: float) -> dict[bytes, bytes]:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    fields = {b"v": str(FORMAT).encode(), b"step": str(step).encode(), b"at": repr(float(published_at)).encode(),
              b"state": buf.getvalue()}
    fields[b"crc"] = _crc(fields)
    return fields


def decode_dense(fields: dict[bytes, bytes]) -> DenseDelta:
    import io

    import torch

    missing = [k for k in ("v", "step", "at", "state", "crc") if k.encode() not in fields]
    if missing:
        raise DeltaError(f"dense entry: missing fields {missing}")
    if fields[b"crc"] != _crc(fields):
        raise DeltaError("crc: checksum mismatch (a torn or corrupted dense entry)")
    try:
        state = torch.load(io.BytesIO(fields[b"state"]), weights_only=True)
        return DenseDelta(int(fields[b"step"]), float(fields[b"at"]), dict(state))
    except Exception as e:  # a state this torch cannot read
        raise DeltaError(f"state: does not load ({type(e).__name__}: {e})") from None
