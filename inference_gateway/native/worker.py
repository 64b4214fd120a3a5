"""A Python worker of serve-native: whole batches of serialized requests (Predict, the Open Inference
Protocol's ModelInfer and its metadata calls) in over a unix socket from the frontend (frontend.cc), one
TBE lookup and one dense forward per batch, a status and a serialized response (or an error message) out
per request. Scores equal `serve`'s; a bad request gets `serve`'s check's error and spoils no other;
nothing a request holds stops the worker. The tables are mapped read-only from the supervisor's table
images, so N workers hold one copy.

    python -m inference_gateway.native.worker SOCKET SPEC_JSON [NICE]

SPEC_JSON (written by the supervisor, fixed for the worker's life: a model change starts new workers):
{"models": [{"name", "version", "path", "image"}], "defaults": {name: version}, "default_model": name}.
Requests resolve their model and version by serve's rules (versions.VersionTable).

Wire (little-endian): batch = u32 n, n x (u8 method: METHODS' index, u32 len, request bytes); reply = u32
n, n x (u8 gRPC status code, u32 len, response bytes or error message).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import os
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from inference_gateway import oip
from inference_gateway.batching import merge
from inference_gateway.model import ServingModel
from inference_gateway.native.predict_batch import decode_batch, predict_response, predict_responses
from inference_gateway.requests import Limits, RequestError, decode
from inference_gateway.versions import VersionTable
from protos import inference_pb2
from protos import open_inference_pb2 as oip_pb
from protos.package import load_package

U32 = struct.Struct("<I")
HEAD = struct.Struct("<BI")  # a reply: status code, length
ITEM = struct.Struct("<BI")  # a request: method number, length


# frontend.cc's kMethods; a PredictStream message is scored as a Predict (the frontend writes it to the stream)
METHODS = ("Predict", "ModelInfer", "ModelMetadata", "ModelReady", "ServerMetadata", "PredictStream")
PREDICT, INFER, MODEL_METADATA, MODEL_READY, SERVER_METADATA, PREDICT_STREAM = range(len(METHODS))
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


@dataclass
class Scoring:
    """A request in the batch's forward: where its answer goes, its samples, and how its scores are encoded."""

    index: int
    model: ServingModel
    samples: int
    respond: Callable[[np.ndarray], bytes]


class Worker:
    """One process's models (tables mapped from the shared images) and how it answers a batch."""

    def __init__(self, spec: dict) -> None:
        torch.set_num_threads(1)  # one core per worker; workers are the parallelism
        self.table: VersionTable[ServingModel] = VersionTable()
        for m in spec["models"]:
            pkg = load_package(m["path"], read_tables=False)
            pkg.manifest["name"], pkg.manifest["version"] = m["name"], int(m["version"])
            model = ServingModel(pkg, table_image=m["image"])
            model.warm_up()
            self.table.add(model.name, model.version, model)
        self.table.defaults = {k: int(v) for k, v in spec["defaults"].items()}
        self.table.default_model = spec["default_model"]
        self.limits = Limits()
        try:
            self.server_version = importlib.metadata.version("recsys-ps")
        except importlib.metadata.PackageNotFoundError:
            self.server_version = "0+unknown"

    def answer(self, items: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """One (status, bytes) per (method, body), in order. Predict and ModelInfer requests are scored in
        one forward; a body that does not parse, names another model or fails a check is answered alone; any
        other error fails only the requests it touched (INTERNAL)."""
        out: list[tuple[int, bytes]] = [(0, b"")] * len(items)
        items = [(PREDICT if m == PREDICT_STREAM else m, body) for m, body in items]
        if all(m == PREDICT for m, _ in items) and self._predict_batch(items, out):
            return out
        scoring, decoded = [], []
        for i, (method, body) in enumerate(items):
            try:
                if method == PREDICT:
                    r = _parse(inference_pb2.PredictRequest, body)
                    m = self.table.resolve(r.model, r.version)
                    d = decode(r, m, self.limits)
                    scoring.append(Scoring(i, m, d.batch_size, lambda s, r=r, m=m: predict_response(r, m, s)))
                elif method == INFER:
                    r = _parse(oip_pb.ModelInferRequest, body)
                    m = self.table.resolve(r.model_name, oip.parse_version(r.model_version, "model_version"))
                    d, batched = oip.decode_infer(r, m, self.limits)
                    scoring.append(Scoring(i, m, d.batch_size,
                                           lambda s, r=r, m=m, b=batched: _infer_response(r, m, s, b)))
                else:
                    out[i] = (0, self._metadata(method, body))
                    continue
                decoded.append(d)
            except RequestError as e:
                out[i] = (e.code.value[0], e.message.encode())
            except Exception as e:  # this request alone fails
                out[i] = (INTERNAL, f"decoding failed: {type(e).__name__}: {e}".encode())
        for model in {id(sc.model): sc.model for sc in scoring}.values():  # one forward per model version
            these = [(sc, d) for sc, d in zip(scoring, decoded, strict=True) if sc.model is model]
            try:
                _scored(out, [sc for sc, _ in these], model, merge([d for _, d in these]))
            except Exception as e:  # these requests fail, the worker keeps serving
                for sc, _ in these:
                    out[sc.index] = (INTERNAL, f"scoring failed: {type(e).__name__}: {e}".encode())
        return out

    def _predict_batch(self, items: list[tuple[int, bytes]], out: list[tuple[int, bytes]]) -> bool:
        """The fast path for a batch of Predict requests alike: one check and one forward; False when any
        request needs the request-by-request path."""
        try:
            reqs = [inference_pb2.PredictRequest.FromString(b) for _, b in items]
            models = {id(m): m for m in (self.table.resolve(*k) for k in {(r.model, r.version) for r in reqs})}
            if len(models) != 1:
                return False
            [model] = models.values()
            whole = decode_batch(reqs, model, self.limits)
            if whole is None:
                return False
            for i, answer in enumerate(predict_responses(reqs, model, model.scores(*merge([whole])).numpy())):
                out[i] = (0, answer)
            return True
        except Exception:  # RequestError or worse: the per-request path says which request and why
            return False

    def _metadata(self, method: int, body: bytes) -> bytes:
        """The OIP's model and server metadata, as serve answers them."""
        if method == SERVER_METADATA:
            _parse(oip_pb.ServerMetadataRequest, body)
            return oip_pb.ServerMetadataResponse(name="recsys-inference-gateway", version=self.server_version,
                                              extensions=[]).SerializeToString()
        if method == MODEL_READY:
            r = _parse(oip_pb.ModelReadyRequest, body)
            version = oip.parse_version(r.version, "version")
            try:
                self.table.resolve(r.name, version)
            except RequestError:
                return oip_pb.ModelReadyResponse(ready=False).SerializeToString()
            return oip_pb.ModelReadyResponse(ready=True).SerializeToString()
        if method == MODEL_METADATA:
            r = _parse(oip_pb.ModelMetadataRequest, body)
            m = self.table.resolve(r.name, oip.parse_version(r.version, "version"))
            return oip_pb.ModelMetadataResponse(
                name=m.name, versions=[str(v) for v in sorted(self.table.models[m.name])], platform=oip.PLATFORM,
                inputs=oip.input_metadata(m),
                outputs=[oip_pb.ModelMetadataResponse.TensorMetadata(name=oip.OUTPUT, datatype="FP32", shape=[-1])],
            ).SerializeToString()
        raise RequestError(grpc.StatusCode.UNIMPLEMENTED, f"method number {method} is not known to this worker")


def _scored(out: list[tuple[int, bytes]], scoring: list[Scoring], model: ServingModel,
            batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    scores = model.scores(*batch).numpy()
    start = 0
    for sc in scoring:
        out[sc.index] = (0, sc.respond(scores[start:start + sc.samples]))
        start += sc.samples


def _infer_response(r: oip_pb.ModelInferRequest, m: ServingModel, scores: np.ndarray, batched: bool) -> bytes:
    """As serve's ModelInfer answers: `scores` [B, 1] for the batched input form, else [B]."""
    return oip_pb.ModelInferResponse(
        model_name=m.name, model_version=str(m.version), id=r.id,
        outputs=[oip_pb.ModelInferResponse.InferOutputTensor(
            name=oip.OUTPUT, datatype="FP32", shape=[len(scores), 1] if batched else [len(scores)])],
        raw_output_contents=[scores.tobytes()]).SerializeToString()


def _parse(kind, body: bytes):
    """`kind` from the request's bytes; INVALID_ARGUMENT naming the message type when they are not one."""
    try:
        return kind.FromString(body)
    except DecodeError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a {kind.DESCRIPTOR.name} ({e})") from None


def lower_priority(nice: int) -> None:
    """Every thread of this process at `nice` (Linux's niceness is a thread's): on cores shared with the
    frontend, a worker that has loaded yields to the frontend's loop and dispatchers, which accept, refuse and
    answer calls in microseconds, instead of making them wait out its slice (no privilege needed to lower)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended since the listing
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def serve(sock_path: str, spec_path: str, nice: int = 0) -> None:
    with open(spec_path) as f:
        worker = Worker(json.load(f))
    lower_priority(nice)  # once loaded: loading at full priority keeps a replacement's start short
    # ~220k objects live once torch, fbgemm and the models are loaded: a full collection would walk them all
    # (~100 ms with a batch's requests waiting); frozen, it skips them (~0 ms). Batches allocate and free in
    # balance (no collection in 3,000 of them, measured), so this guards against the rare one
    gc.collect()  # what loading left in cycles, before the rest is frozen
    gc.freeze()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    f = s.makefile("rb", buffering=1 << 20)
    while len(head := f.read(4)) == 4:
        (n,) = U32.unpack(head)
        items = []
        for _ in range(n):
            method, size = ITEM.unpack(f.read(ITEM.size))
            items.append((method, f.read(size)))
        parts = [U32.pack(n)]
        for code, body in worker.answer(items):
            parts += [HEAD.pack(code, len(body)), body]
        s.sendall(b"".join(parts))


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
