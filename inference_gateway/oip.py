"""The Open Inference Protocol (KServe v2 gRPC, `inference.GRPCInferenceService`) beside the project's
own API, so Triton's and KServe's clients call the gateway unchanged.

A model's inputs are its package's features: `dense` FP32 [-1, dense_features], and per sparse feature
`<feature>.lengths` (one bag length per sample) and `<feature>.values` (the ids of the bags), INT64 or
INT32 [-1]; the output is `scores` FP32 [-1]. Contents come raw (`raw_input_contents`) or typed. A
ModelInfer request is decoded into the same `Decoded` as Predict, checked by the same `validate`, and
goes through the same admission, batching, deadlines and metrics.

The generated module defines package `inference`, as tritonclient's bundled stubs do: the server imports
this module only when it starts, so a process that imports tritonclient.grpc never loads both.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import time

import grpc
import numpy as np

from inference_gateway.model import ServingModel
from inference_gateway.requests import Decoded, Limits, RequestError, validate
from inference_gateway.servicer import OK, GatewayServicer
from protos import open_inference_pb2 as oip
from protos import open_inference_pb2_grpc as oip_grpc

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INFER = ("ModelInfer",)  # guarded by --predict-token-file like Predict; metadata and readiness stay open
OUTPUT = "scores"
PLATFORM = "recsys_dlrm_fbgemm"
# datatype -> (numpy dtype, the typed-contents field that carries it)
DTYPES = {"FP32": (np.float32, "fp32_contents"), "INT64": (np.int64, "int64_contents"),
          "INT32": (np.int32, "int_contents")}
SPARSE_DTYPES = ("INT64", "INT32")


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def lengths_input(feature: str) -> str:
    return f"{feature}.lengths"


def values_input(feature: str) -> str:
    return f"{feature}.values"


def parse_version(text: str, field: str) -> int:
    """"" -> 0 (the default version); otherwise a positive decimal."""
    if not text:
        return 0
    if not text.isdecimal() or int(text) < 1:
        raise _invalid(f"{field}: {text!r} is not a version number (a positive integer, or empty for the default)")
    return int(text)


def input_metadata(model: ServingModel) -> list[oip.ModelMetadataResponse.TensorMetadata]:
    tm = oip.ModelMetadataResponse.TensorMetadata
    out = [tm(name="dense", datatype="FP32", shape=[-1, model.dense_features])]
    for f in model.features:
        out += [tm(name=lengths_input(f), datatype="INT64", shape=[-1]),
                tm(name=values_input(f), datatype="INT64", shape=[-1])]
    return out


def _tensor(inp: oip.ModelInferRequest.InferInputTensor, raw: bytes | None, accepted: tuple[str, ...]) -> np.ndarray:
    """One input as an array of its declared shape; INVALID_ARGUMENT naming the input otherwise."""
    name = inp.name
    if inp.datatype not in accepted:
        raise _invalid(f"{name}: datatype {inp.datatype or '(empty)'} is not one of {list(accepted)}")
    dtype, typed_field = DTYPES[inp.datatype]
    shape = tuple(inp.shape)
    n = 1
    for d in shape:
        if d < 0:
            raise _invalid(f"{name}: negative dimension in shape {list(shape)}")
        n *= d
    if raw is not None:
        if inp.HasField("contents"):
            raise _invalid(f"{name}: both contents and raw_input_contents are set")
        itemsize = np.dtype(dtype).itemsize
        if len(raw) != n * itemsize:
            raise _invalid(f"{name}: {len(raw)} bytes do not match shape {list(shape)} of {inp.datatype} "
                           f"({n * itemsize} expected)")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    typed = getattr(inp.contents, typed_field)
    if len(typed) != n:
        raise _invalid(f"{name}: {len(typed)} elements in contents.{typed_field} do not match shape {list(shape)} "
                       f"({n} expected)")
    return np.asarray(typed, dtype=dtype).reshape(shape)


def decode_infer(req: oip.ModelInferRequest, model: ServingModel, limits: Limits) -> Decoded:
    """ModelInfer inputs -> the Decoded a Predict request of the same samples gives."""
    raws = req.raw_input_contents
    if raws and len(raws) != len(req.inputs):
        raise _invalid(f"raw_input_contents: {len(raws)} entries for {len(req.inputs)} inputs (one per input)")
    for out in req.outputs:
        if out.name != OUTPUT:
            raise _invalid(f"outputs: unknown output {out.name!r} (model {model.name} v{model.version} has "
                           f"[{OUTPUT!r}])")
    expected = ["dense"] + [n for f in model.features for n in (lengths_input(f), values_input(f))]
    by_name: dict[str, int] = {}
    for i, inp in enumerate(req.inputs):
        if inp.name in by_name:
            raise _invalid(f"inputs: duplicate input {inp.name!r}")
        by_name[inp.name] = i
    unknown = [n for n in by_name if n not in set(expected)]
    if unknown:
        raise _invalid(f"inputs: unknown input {unknown[0]!r} (model {model.name} v{model.version} takes "
                       f"{expected})")
    missing = [n for n in expected if n not in by_name]
    if missing:
        raise _invalid(f"inputs: missing input {missing[0]!r} (model {model.name} v{model.version} takes "
                       f"{expected})")

    def tensor(name: str, accepted: tuple[str, ...]) -> np.ndarray:
        i = by_name[name]
        return _tensor(req.inputs[i], raws[i] if raws else None, accepted)

    dense = tensor("dense", ("FP32",))
    batch = dense.shape[0] if dense.ndim == 2 else -1

    @functools.cache
    def sparse() -> tuple[np.ndarray, np.ndarray]:
        lengths, values = [], []
        for f in model.features:
            ln, vn = lengths_input(f), values_input(f)
            lens = tensor(ln, SPARSE_DTYPES)
            if lens.ndim != 1 or lens.size != batch:
                raise _invalid(f"{ln}: shape {list(lens.shape)}, expected [{batch}] (one bag length per sample "
                               "of dense)")
            if (lens < 0).any():
                raise _invalid(f"{ln}: negative entry")
            vals = tensor(vn, SPARSE_DTYPES)
            if vals.ndim != 1:
                raise _invalid(f"{vn}: expected shape [-1], got {list(vals.shape)}")
            total = int(lens.sum())
            if total != vals.size:
                raise _invalid(f"{ln}: add up to {total} but {vn} holds {vals.size} ids")
            lengths.append(lens.astype(np.int64, copy=False))
            values.append(vals.astype(np.int64, copy=False))
        return np.concatenate(lengths), np.concatenate(values)

    # validate checks dense first (width, finiteness, limits), then reads the sparse inputs
    return validate(dense, [], lambda: sparse()[0], lambda: sparse()[1], model, limits)


def infer_request(dense: np.ndarray, lengths: np.ndarray, values: np.ndarray, features: list[str], *,
                  model: str = "", version: str = "", request_id: str = "") -> oip.ModelInferRequest:
    """Predict's arrays (lengths [F * B] feature-major in `features` order, values) as a ModelInferRequest
    with raw contents: what a Triton client sends (benchmarks)."""
    dense = np.ascontiguousarray(dense, dtype=np.float32)
    lens = np.asarray(lengths, dtype=np.int64).reshape(len(features), dense.shape[0])
    segments = np.split(np.asarray(values, dtype=np.int64), np.cumsum(lens.sum(1))[:-1])
    tensor = oip.ModelInferRequest.InferInputTensor
    req = oip.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    req.inputs.append(tensor(name="dense", datatype="FP32", shape=list(dense.shape)))
    req.raw_input_contents.append(dense.tobytes())
    for f, ln, seg in zip(features, lens, segments, strict=True):
        for name, a in ((lengths_input(f), ln), (values_input(f), seg)):
            req.inputs.append(tensor(name=name, datatype="INT64", shape=[a.size]))
            req.raw_input_contents.append(a.tobytes())
    return req


class OpenInferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Serves the protocol from the gateway's registry, admission and batchers."""

    def __init__(self, gateway: GatewayServicer) -> None:
        self.gw = gateway
        try:
            self.version = importlib.metadata.version("recsys-ps")
        except importlib.metadata.PackageNotFoundError:
            self.version = "0+unknown"

    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=len(self.gw.registry) > 0 and not self.gw.draining)

    async def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(name="recsys-inference-gateway", version=self.version, extensions=[])

    async def ModelReady(self, request, context):
        version = await self._version(request.version, "version", context)
        try:
            self.gw.registry.resolve(request.name, version)
        except RequestError:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=not self.gw.draining)

    async def ModelMetadata(self, request, context):
        version = await self._version(request.version, "version", context)
        try:
            loaded = self.gw.registry.resolve(request.name, version)
        except RequestError as e:
            await context.abort(e.code, e.message)
        m = loaded.model
        return oip.ModelMetadataResponse(
            name=m.name, versions=[str(v) for v in self.gw.registry.versions(m.name)], platform=PLATFORM,
            inputs=input_metadata(m),
            outputs=[oip.ModelMetadataResponse.TensorMetadata(name=OUTPUT, datatype="FP32", shape=[-1])])

    @staticmethod
    async def _version(text: str, field: str, context) -> int:
        try:
            return parse_version(text, field)
        except RequestError as e:
            await context.abort(e.code, e.message)

    async def ModelInfer(self, request, context):
        gw = self.gw
        start = time.perf_counter()
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        facts: dict = {"request_id": request.id, "model": request.model_name, "version": request.model_version,
                       "samples": 0}
        try:
            loaded = gw.registry.resolve(request.model_name, parse_version(request.model_version, "model_version"))
            m = loaded.model
            facts.update(model=m.name, version=m.version)
            gw.admit(loaded, deadline)
            decoded = decode_infer(request, m, gw.limits)
            facts["samples"] = decoded.batch_size
            fut = gw.queue(loaded, decoded, deadline)
            with contextlib.suppress(Exception):  # read by scores(); a client that leaves cancels `fut`
                await fut
            scores = gw.scores(fut)
        except RequestError as e:
            gw.record("ModelInfer", start, e.code, lambda: facts, e.message)
            context.set_code(e.code)
            context.set_details(e.message)
            return oip.ModelInferResponse()
        gw.record("ModelInfer", start, OK, lambda: facts)
        return oip.ModelInferResponse(
            model_name=m.name, model_version=str(m.version), id=request.id,
            outputs=[oip.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype="FP32", shape=[len(scores)])],
            raw_output_contents=[scores.tobytes()])
