"""A Python worker of the prototype native frontend: whole batches of serialized PredictRequests in over
a unix socket, one TBE lookup and one dense forward per batch, a status and a serialized PredictResponse
(or an error message) out per request. Scores equal `serve`'s; a bad request gets `serve`'s check's
error and spoils no other; nothing a request holds stops the worker.

    python -m benchmarks.native_frontend.worker SOCKET PACKAGE TABLE_IMAGE

Wire (little-endian): batch = u32 n, n x (u32 len, request bytes); reply = u32 n, n x (u8 gRPC status
code, u32 len, response bytes or error message).
"""

from __future__ import annotations

import socket
import struct
import sys

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from inference_gateway.batching import merge
from inference_gateway.model import ServingModel
from inference_gateway.package import load_package
from inference_gateway.requests import Decoded, Limits, RequestError, decode, segment_reorder, validate
from protos import common_pb2, inference_pb2

U32 = struct.Struct("<I")
HEAD = struct.Struct("<BI")
_INT = {common_pb2.INT64: np.int64, common_pb2.INT32: np.int32}
UNLIMITED = Limits(max_request_samples=1 << 62, max_request_ids=1 << 62)


def decode_batch(reqs: list[inference_pb2.PredictRequest], model: ServingModel, limits: Limits) -> Decoded | None:
    """Every request of a batch as one, checked once by `validate` (a few numpy calls per batch, not per
    request); None when the requests are not alike or one is malformed (then each is decoded alone, which
    also gives a bad one its own error and spoils no other)."""
    first = reqs[0]
    if any(r.model not in ("", model.name) or r.version not in (0, model.version) for r in reqs):
        return None  # each alone: NOT_FOUND for another model or version
    names, width, nfeat = list(first.features), model.dense_features, len(model.features)
    ldt, vdt = _INT.get(first.lengths.dtype), _INT.get(first.values.dtype)
    if ldt is None or vdt is None or (names and len(names) != nfeat):
        return None
    lsize, vsize = np.dtype(ldt).itemsize, np.dtype(vdt).itemsize
    dense, lens, vals, sizes, ids = [], [], [], [], []
    for r in reqs:
        if (r.features != first.features or r.dense.dtype != common_pb2.FLOAT32
                or r.lengths.dtype != first.lengths.dtype or r.values.dtype != first.values.dtype):
            return None
        shape = r.dense.shape
        if len(shape) != 2 or shape[1] != width or not 0 < shape[0] <= limits.max_request_samples:
            return None
        b = shape[0]
        d, ln, v = r.dense.data, r.lengths.data, r.values.data  # upb copies a bytes field per access
        n = len(v) // vsize
        if (len(d) != b * width * 4 or len(ln) != nfeat * b * lsize or list(r.lengths.shape) != [nfeat * b]
                or list(r.values.shape) != [n] or len(v) != n * vsize or n > limits.max_request_ids):
            return None
        dense.append(d)
        lens.append(ln)
        vals.append(v)
        sizes.append(b)
        ids.append(n)
    flat = np.frombuffer(b"".join(lens), dtype=ldt).astype(np.int64)
    if (flat < 0).any() or (flat > max(ids)).any():  # a bag larger than its request's ids: before any sum wraps
        return None
    if all(b == 1 for b in sizes):
        counts = flat.reshape(len(reqs), nfeat)  # [request, feature]
        lengths = counts.T
    else:
        parts, at = [], 0
        for b in sizes:
            parts.append(flat[at:at + nfeat * b].reshape(nfeat, b))
            at += nfeat * b
        lengths = np.concatenate(parts, axis=1)
        counts = np.stack([p.sum(axis=1) for p in parts])
    if not np.array_equal(counts.sum(axis=1), np.asarray(ids)):
        return None
    order = np.arange(counts.size).reshape(counts.shape).T.ravel()  # request-major segments -> feature-major
    values = segment_reorder(np.frombuffer(b"".join(vals), dtype=vdt).astype(np.int64), counts.ravel(), order)
    return validate(np.frombuffer(b"".join(dense), dtype=np.float32).reshape(-1, width), names,
                    lambda: lengths.ravel(), lambda: values, model, UNLIMITED)


class Worker:
    """One process's model (tables mapped from the shared image) and how it answers a batch."""

    def __init__(self, package: str, image: str) -> None:
        torch.set_num_threads(1)  # one core per worker; workers are the parallelism
        self.model = ServingModel(load_package(package, read_tables=False), table_image=image)
        self.model.warm_up()
        self.limits = Limits()

    def answer(self, bodies: list[bytes]) -> list[tuple[int, bytes]]:
        """One (status, bytes) per body, in order. A body that does not parse, names another model, or
        fails a check is answered alone; any other error fails only the requests it touched (INTERNAL)."""
        out: list[tuple[int, bytes]] = [(0, b"")] * len(bodies)
        reqs: list[tuple[int, inference_pb2.PredictRequest]] = []
        for i, b in enumerate(bodies):
            try:
                reqs.append((i, inference_pb2.PredictRequest.FromString(b)))
            except DecodeError as e:
                out[i] = (grpc.StatusCode.INVALID_ARGUMENT.value[0], f"request: not a PredictRequest ({e})".encode())
        if not reqs:
            return out
        try:
            whole = decode_batch([r for _, r in reqs], self.model, self.limits)
        except Exception:  # RequestError or worse: the per-request path below says which request and why
            whole = None
        if whole is not None:
            try:
                return self._scored(out, [(i, r, r.dense.shape[0]) for i, r in reqs], merge([whole]))
            except Exception:  # retried request by request
                pass
        good, decoded = [], []
        for i, r in reqs:
            try:
                if r.model not in ("", self.model.name) or r.version not in (0, self.model.version):
                    raise RequestError(grpc.StatusCode.NOT_FOUND, f"model: {r.model!r} v{r.version} is not served "
                                       f"here (serving {self.model.name!r} v{self.model.version})")
                d = decode(r, self.model, self.limits)
            except RequestError as e:
                out[i] = (e.code.value[0], e.message.encode())
                continue
            except Exception as e:  # this request alone fails
                out[i] = (grpc.StatusCode.INTERNAL.value[0], f"decoding failed: {type(e).__name__}: {e}".encode())
                continue
            good.append((i, r, d.batch_size))
            decoded.append(d)
        if good:
            try:
                self._scored(out, good, merge(decoded))
            except Exception as e:  # the batch's requests fail, the worker keeps serving
                for i, _, _ in good:
                    out[i] = (grpc.StatusCode.INTERNAL.value[0], f"scoring failed: {type(e).__name__}: {e}".encode())
        return out

    def _scored(self, out: list[tuple[int, bytes]], good: list[tuple[int, inference_pb2.PredictRequest, int]],
                batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[tuple[int, bytes]]:
        scores = self.model.scores(*batch).numpy()
        m, start = self.model, 0
        for i, r, b in good:
            out[i] = (0, inference_pb2.PredictResponse(
                scores=common_pb2.Tensor(dtype=common_pb2.FLOAT32, shape=[b], data=scores[start:start + b].tobytes()),
                model=m.name, version=m.version, request_id=r.request_id).SerializeToString())
            start += b
        return out


def serve(sock_path: str, package: str, image: str) -> None:
    worker = Worker(package, image)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    f = s.makefile("rb", buffering=1 << 20)
    while len(head := f.read(4)) == 4:
        (n,) = U32.unpack(head)
        bodies = [f.read(U32.unpack(f.read(4))[0]) for _ in range(n)]
        parts = [U32.pack(n)]
        for code, body in worker.answer(bodies):
            parts += [HEAD.pack(code, len(body)), body]
        s.sendall(b"".join(parts))


if __name__ == "__main__":
    serve(*sys.argv[1:4])
