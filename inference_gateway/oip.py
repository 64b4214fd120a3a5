"""The Open Inference Protocol (KServe v2 gRPC, `inference.GRPCInferenceService`) beside the project's
own API, so Triton's and KServe's clients call the gateway unchanged.

A model's inputs are its package's features: `dense` FP32 [-1, dense_features], and per sparse feature
`<feature>.lengths` (one bag length per sample) and `<feature>.values` (the ids of the bags), INT64 or
INT32 [-1]; the output is `scores` FP32 [-1]. A feature may also come in the batched form that
`serve-triton` requires (Triton checks every input's first dimension against the batch size):
lengths [B, 1] and values [B, K], bag b in the first lengths[b] entries of row b; then `scores` is
answered [B, 1], as serve-triton answers it, so one client calls both (requests.feature_bags). For
single-hot requests both servers also take `dense` and `ids` INT64 [B, features] alone (one id per
feature in package order; two inputs instead of 53 for Criteo, which is what Triton's cost scales with),
and for any bags `dense`, `lengths` INT64 [B, features] and `values` INT64 [B, K] (row b: sample b's bags
in feature order, one after another, then padding): three inputs.
Contents come raw (`raw_input_contents`) or typed. A
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
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np

from inference_gateway.requests import (
    COMPACT,
    IDS,
    LENGTHS,
    VALUES,
    Decoded,
    Limits,
    RequestError,
    feature_bags,
    input_names,
    input_set_error,
    lengths_input,
    sample_bags,
    segment_reorder,
    single_hot,
    validate,
    values_input,
)
from protos import open_inference_pb2 as oip
from protos import open_inference_pb2_grpc as oip_grpc

if TYPE_CHECKING:  # serve-triton's Predict proxy encodes with this module and loads no torch
    from inference_gateway.model import ServingModel
    from inference_gateway.servicer import GatewayServicer

OK = grpc.StatusCode.OK

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INFER = ("ModelInfer",)  # guarded by --predict-token-file like Predict; metadata and readiness stay open
OUTPUT = "scores"
PLATFORM = "recsys_dlrm_fbgemm"
# datatype -> (numpy dtype, the typed-contents field that carries it)
DTYPES = {"FP32": (np.float32, "fp32_contents"), "INT64": (np.int64, "int64_contents"),
          "INT32": (np.int32, "int_contents")}
ITEMSIZE = {name: np.dtype(dtype).itemsize for name, (dtype, _) in DTYPES.items()}
SPARSE_DTYPES = ("INT64", "INT32")


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


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


@dataclass(frozen=True)
class _Inputs:
    """A model's input names: `dense`, then lengths and values of each feature in package order."""

    pairs: list[tuple[str, str]]  # (lengths, values) per feature
    sparse: list[str]  # lengths and values of each feature, in package order
    names: frozenset[str]
    ordered: list[str]


_inputs_of: weakref.WeakKeyDictionary[ServingModel, _Inputs] = weakref.WeakKeyDictionary()


def _model_inputs(model: ServingModel) -> _Inputs:
    known = _inputs_of.get(model)
    if known is None:
        pairs = [(lengths_input(f), values_input(f)) for f in model.features]
        ordered = input_names(model.features)
        sparse = ordered[1:]
        known = _inputs_of[model] = _Inputs(pairs, sparse, frozenset(ordered), ordered)
    return known


@dataclass(frozen=True)
class _Input:
    """One input's header, read from the message once (each upb field access costs about a microsecond,
    and a Criteo-sized request has 53 inputs)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None
    message: oip.ModelInferRequest.InferInputTensor


def _checked(inp: _Input, accepted: tuple[str, ...]) -> tuple[int, ...]:
    """The input's shape once its datatype, shape and content size agree; INVALID_ARGUMENT naming it."""
    name, datatype, shape = inp.name, inp.datatype, inp.shape
    if datatype not in accepted:
        raise _invalid(f"{name}: datatype {datatype or '(empty)'} is not one of {list(accepted)}")
    n = 1
    for d in shape:
        if d < 0:
            raise _invalid(f"{name}: negative dimension in shape {list(shape)}")
        n *= d
    if inp.raw is not None:
        itemsize = ITEMSIZE[datatype]
        if len(inp.raw) != n * itemsize:
            raise _invalid(f"{name}: {len(inp.raw)} bytes do not match shape {list(shape)} of {datatype} "
                           f"({n * itemsize} expected)")
    else:
        typed_field = DTYPES[datatype][1]
        count = len(getattr(inp.message.contents, typed_field))
        if count != n:
            raise _invalid(f"{name}: {count} elements in contents.{typed_field} do not match shape {list(shape)} "
                           f"({n} expected)")
    return shape


def _array(inp: _Input, shape: tuple[int, ...]) -> np.ndarray:
    dtype, typed_field = DTYPES[inp.datatype]
    if inp.raw is not None:
        return np.frombuffer(inp.raw, dtype=dtype).reshape(shape)
    return np.asarray(getattr(inp.message.contents, typed_field), dtype=dtype).reshape(shape)


def _headers(req: oip.ModelInferRequest) -> list[_Input]:
    messages = list(req.inputs)
    raws = list(req.raw_input_contents)
    if not raws:
        return [_Input(m.name, m.datatype, tuple(m.shape), None, m) for m in messages]
    if len(raws) != len(messages):
        raise _invalid(f"raw_input_contents: {len(raws)} entries for {len(messages)} inputs (one per input)")
    out = [_Input(m.name, m.datatype, tuple(m.shape), raw, m) for m, raw in zip(messages, raws, strict=True)]
    both = next((m.name for m in messages if m.HasField("contents")), None)
    if both is not None:
        raise _invalid(f"{both}: both contents and raw_input_contents are set")
    return out


def decode_infer(req: oip.ModelInferRequest, model: ServingModel, limits: Limits) -> tuple[Decoded, bool]:
    """ModelInfer inputs -> the Decoded a Predict request of the same samples gives, and whether the
    request used the batched form (then `scores` is answered [B, 1], as serve-triton answers it)."""
    inputs = _headers(req)
    for out in req.outputs:
        if out.name != OUTPUT:
            raise _invalid(f"outputs: unknown output {out.name!r} (model {model.name} v{model.version} has "
                           f"[{OUTPUT!r}])")
    expected = _model_inputs(model)
    by_name: dict[str, _Input] = {}
    for inp in inputs:
        if inp.name in by_name:
            raise _invalid(f"inputs: duplicate input {inp.name!r}")
        if inp.name not in expected.names and inp.name not in COMPACT:
            raise _invalid(f"inputs: unknown input {inp.name!r} (model {model.name} v{model.version} takes "
                           f"{expected.ordered}, or dense and {IDS!r}, or dense, {LENGTHS!r} and {VALUES!r})")
        by_name[inp.name] = inp
    wrong = input_set_error(by_name, model)
    if wrong:
        raise _invalid(wrong)
    dense_in = by_name["dense"]
    dense = _array(dense_in, _checked(dense_in, ("FP32",)))
    batch = dense.shape[0] if dense.ndim == 2 else -1

    def sparse() -> tuple[np.ndarray, np.ndarray, bool]:
        if IDS in by_name:
            return single_hot(_array(by_name[IDS], _checked(by_name[IDS], SPARSE_DTYPES)), len(model.features), batch)
        if LENGTHS in by_name:
            lengths, values = (_array(by_name[n], _checked(by_name[n], SPARSE_DTYPES)) for n in (LENGTHS, VALUES))
            return sample_bags(lengths, values, len(model.features), batch)
        arrays = [_array(by_name[n], _checked(by_name[n], SPARSE_DTYPES)) for n in expected.sparse]
        return feature_bags(expected.pairs, arrays[0::2], arrays[1::2], batch)

    parts: list[tuple[np.ndarray, np.ndarray, bool]] = []

    def part(k: int) -> np.ndarray:
        if not parts:
            parts.append(sparse())
        return parts[0][k]

    # validate checks dense first (width, finiteness, limits), then reads the sparse inputs
    decoded = validate(dense, [], lambda: part(0), lambda: part(1), model, limits)
    return decoded, parts[0][2]


def infer_request(dense: np.ndarray, lengths: np.ndarray, values: np.ndarray, features: list[str], *,
                  model: str = "", version: str = "", request_id: str = "") -> oip.ModelInferRequest:
    """Predict's arrays (lengths [F * B] feature-major in `features` order, values) as a ModelInferRequest
    with raw contents in the form both gateways take (encode_decoded): what a Triton client sends."""
    dense = np.ascontiguousarray(dense, dtype=np.float32)
    lens = np.asarray(lengths, dtype=np.int64).reshape(len(features), dense.shape[0])
    decoded = Decoded(dense, lens, np.asarray(values, dtype=np.int64), lens.sum(1))
    return encode_decoded(decoded, features, model=model, version=version, request_id=request_id)


def encode_decoded(decoded: Decoded, features: list[str], *, model: str, version: str = "",
                   request_id: str = "") -> oip.ModelInferRequest:
    """A validated request (package feature order, see requests.Decoded) as what serve-triton's Predict
    proxy forwards to tritonserver, in the compact forms a batching Triton model takes (3 inputs at most:
    Triton's cost grows with the inputs): all bags of one id -> `dense` + `ids` [B, features]; otherwise
    `dense` + `lengths` [B, features] + `values` [B, K] (row b: sample b's bags in feature order, then
    padding). Cached input headers."""
    batch, width = decoded.dense.shape
    nfeat = len(features)
    lens = np.asarray(decoded.lengths, dtype=np.int64).reshape(nfeat, batch)
    values = np.asarray(decoded.values, dtype=np.int64)
    raws = [np.ascontiguousarray(decoded.dense, dtype=np.float32).tobytes()]
    if values.size == lens.size and bool((lens == 1).all()):
        raws.append(np.ascontiguousarray(values.reshape(nfeat, batch).T).tobytes())
        k = 0
    else:
        by_sample = np.ascontiguousarray(lens.T)
        totals = by_sample.sum(1)
        k = max(int(totals.max(initial=0)), 1)
        flat = segment_reorder(values, lens.ravel(), np.arange(nfeat * batch).reshape(nfeat, batch).T.ravel())
        padded = np.zeros((batch, k), dtype=np.int64)
        padded[np.arange(k) < totals[:, None]] = flat
        raws += [by_sample.tobytes(), padded.tobytes()]
    return oip.ModelInferRequest(model_name=model, model_version=version, id=request_id,
                                 inputs=_headers_of(nfeat, width, batch, k), raw_input_contents=raws)


@functools.lru_cache(maxsize=256)
def _headers_of(nfeat: int, width: int, batch: int, k: int) -> list[oip.ModelInferRequest.InferInputTensor]:
    """The inputs' headers of one request shape (traffic repeats a few shapes); k = 0: the `ids` form, else
    the compact multi-hot form with `values` [batch, k]."""
    tensor = oip.ModelInferRequest.InferInputTensor
    out = [tensor(name="dense", datatype="FP32", shape=[batch, width])]
    if not k:
        return [*out, tensor(name=IDS, datatype="INT64", shape=[batch, nfeat])]
    return [*out, tensor(name=LENGTHS, datatype="INT64", shape=[batch, nfeat]),
            tensor(name=VALUES, datatype="INT64", shape=[batch, k])]


def decode_scores(resp: oip.ModelInferResponse, batch: int) -> np.ndarray:
    """The `scores` output of a ModelInferResponse (raw or typed contents) as float32 [batch];
    ValueError naming what does not fit."""
    names = [o.name for o in resp.outputs]
    if OUTPUT not in names:
        raise ValueError(f"outputs: no {OUTPUT!r} in the answer (got {names})")
    i = names.index(OUTPUT)
    out = resp.outputs[i]
    if out.datatype != "FP32":
        raise ValueError(f"{OUTPUT}: datatype {out.datatype}, expected FP32")
    if resp.raw_output_contents:
        scores = np.frombuffer(resp.raw_output_contents[i], dtype=np.float32)
    else:
        scores = np.asarray(out.contents.fp32_contents, dtype=np.float32)
    if scores.size != batch:
        raise ValueError(f"{OUTPUT}: {scores.size} scores for {batch} samples")
    return scores


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
            decoded, batched = decode_infer(request, m, gw.limits)
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
            outputs=[oip.ModelInferResponse.InferOutputTensor(
                name=OUTPUT, datatype="FP32", shape=[len(scores), 1] if batched else [len(scores)])],
            raw_output_contents=[scores.tobytes()])
