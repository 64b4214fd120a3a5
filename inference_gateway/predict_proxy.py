"""The project's Predict / PredictStream / ListModels in front of an Open Inference Protocol server.

Why: tritonserver cannot host a custom gRPC service, so `serve-triton` serves `recsys.v1.InferenceGateway`
on an inference-side port of its own and forwards each request to tritonserver's KServe v2 port on
loopback. A request is decoded and checked by the code `serve` uses (requests.decode / validate) against
a ModelSpec (the package's facts from shared_tables: no torch, no tables in this process), so bad
input gets serve's precise status and is never forwarded; a valid one becomes one ModelInfer in
`serve`'s OIP schema (oip.encode_decoded) on one grpc.aio channel, with the caller's remaining time
as its timeout. The target's errors come back with the codes `serve` would give.

The target is any server of that schema: serve-triton's tritonserver, or `serve` itself (tests, and
`python -m inference_gateway.predict_proxy --target HOST:PORT --model PKG` standalone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from inference_gateway import oip
from inference_gateway.control_plane import PREDICT, SERVICE_NAME
from inference_gateway.requests import Limits, RequestError, decode
from inference_gateway.streams import answers
from protos import common_pb2, inference_pb2, inference_pb2_grpc
from protos.channels import channel_options
from protos.rejects import AioDecodeGuard, Rejects
from protos.security import AioControlPlaneAuth, TlsConfig, TokenRule, bind, full_names, read_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What requests.validate reads of a model (ServingModel's attributes of the same names), from the
    facts shared_tables.serving_facts reports."""

    facts: dict
    name: str = field(init=False)
    version: int = field(init=False)
    features: list[str] = field(init=False)
    feature_index: dict[str, int] = field(init=False)
    dense_features: int = field(init=False)
    rows_per_feature: np.ndarray = field(init=False)
    out_of_range: str = field(init=False)

    def __post_init__(self) -> None:
        f = self.facts
        for k, v in (("name", f["name"]), ("version", int(f["version"])), ("features", list(f["features"])),
                     ("feature_index", {n: i for i, n in enumerate(f["features"])}),
                     ("dense_features", int(f["dense_features"])),
                     ("rows_per_feature", np.asarray(f["rows_per_feature"], dtype=np.int64)),
                     ("out_of_range", f["out_of_range"])):
            object.__setattr__(self, k, v)

    def info(self, is_default: bool) -> inference_pb2.ModelInfo:
        f = self.facts
        return inference_pb2.ModelInfo(
            name=f["name"], version=f["version"], is_default=is_default, path=f["path"], features=f["features"],
            dense_features=f["dense_features"], table_dtypes=f["table_dtypes"], table_bytes=f["table_bytes"],
            dense_quantization=f["dense_quantization"])


class Catalog(Protocol):
    """The loaded models, as the target serves them: name -> version -> spec (first name: the default
    model; unversioned requests go to the highest version, Triton's rule)."""

    def specs(self) -> Mapping[str, Mapping[int, ModelSpec]]: ...


def resolve(catalog: Catalog, name: str, version: int) -> ModelSpec:
    """The version a request runs on; the same statuses as serve's registry."""
    models = catalog.specs()
    name = name or next(iter(models), "")
    versions = models.get(name)
    if not versions:
        if not name:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "model: no model is loaded")
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"model: {name!r} is not loaded (loaded: {sorted(models)})")
    v = version or max(versions)
    spec = versions.get(v)
    if spec is None:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"version: model {name!r} has no version {v} "
                                                      f"(loaded: {sorted(versions)})")
    return spec


def infos(catalog: Catalog) -> list[inference_pb2.ModelInfo]:
    return [s.info(v == max(vs)) for _, vs in sorted(catalog.specs().items()) for v, s in sorted(vs.items())]


def forwarded_error(e: grpc.aio.AioRpcError, spec: ModelSpec, target: str) -> RequestError:
    """The target's status as serve would answer: Triton's full queue ("Exceeds maximum queue size",
    UNAVAILABLE) is RESOURCE_EXHAUSTED as serve's; UNKNOWN is INTERNAL; the rest keep their code."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and "queue size" in details:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif code == grpc.StatusCode.UNKNOWN:
        code = grpc.StatusCode.INTERNAL
    return RequestError(code, f"model {spec.name} v{spec.version}: {target}: {details}")


class PredictProxy(inference_pb2_grpc.InferenceGatewayServicer):
    """Predict, PredictStream and ListModels; the model-management methods stay UNIMPLEMENTED here (they
    live on serve-triton's management port)."""

    def __init__(self, catalog: Catalog, target: str, limits: Limits | None = None,
                 max_message_bytes: int = 64 << 20) -> None:
        self.catalog, self.target, self.limits = catalog, target, limits or Limits()
        self.channel = grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes))
        self.infer = oip.oip_grpc.GRPCInferenceServiceStub(self.channel).ModelInfer

    async def close(self) -> None:
        await self.channel.close()

    async def predict(self, req: inference_pb2.PredictRequest, deadline: float | None) -> inference_pb2.PredictResponse:
        """Checked, forwarded, answered; RequestError for anything refused on the way."""
        spec = resolve(self.catalog, req.model, req.version)
        decoded = decode(req, spec, self.limits)
        forward = oip.encode_decoded(decoded, spec.features, model=spec.name,
                                     version=str(req.version) if req.version else "", request_id=req.request_id)
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before forwarding")
        try:
            resp = await self.infer(forward, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise forwarded_error(e, spec, self.target) from None
        try:
            scores = oip.decode_scores(resp, decoded.batch_size)
        except ValueError as e:
            raise RequestError(grpc.StatusCode.INTERNAL, f"model {spec.name} v{spec.version}: {self.target} "
                                                         f"answered {e}") from None
        version = int(resp.model_version) if resp.model_version.isdecimal() else spec.version
        return inference_pb2.PredictResponse(
            scores=common_pb2.Tensor(dtype=common_pb2.FLOAT32, shape=[len(scores)], data=scores.tobytes()),
            model=spec.name, version=version, request_id=req.request_id)

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def Predict(self, request, context):
        try:
            return await self.predict(request, self._deadline(context))
        except RequestError as e:
            context.set_code(e.code)
            context.set_details(e.message)
            return inference_pb2.PredictResponse()

    async def PredictStream(self, request_iterator, context):
        """Each message is forwarded as it arrives and answered when its answer comes (any order); a bad
        message gets a response with `error` set and the stream goes on."""
        deadline = self._deadline(context)
        out: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Future] = set()

        async def one(req: inference_pb2.PredictRequest) -> None:
            try:
                resp = await self.predict(req, deadline)
            except RequestError as e:
                resp = inference_pb2.PredictResponse(request_id=req.request_id, error=inference_pb2.Status(
                    code=e.code.value[0], message=e.message))
            out.put_nowait(resp)

        async def read() -> None:
            async for req in request_iterator:
                task = asyncio.ensure_future(one(req))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:
                await asyncio.gather(*list(pending))
            out.put_nowait(None)

        def cancel_pending() -> None:
            for task in list(pending):
                task.cancel()

        async with contextlib.aclosing(answers(read(), out, cancel_pending)) as stream:
            async for resp in stream:
                yield resp

    async def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(models=infos(self.catalog))


def add_to_server(proxy: PredictProxy, host: str, port: int, predict_token: str | None,
                  tls: TlsConfig | None = None, max_message_bytes: int = 64 << 20) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with the proxy (Predict / PredictStream behind `predict_token` when set; undecodable
    requests INVALID_ARGUMENT; reflection; TLS, mutual with tls.client_ca, when `tls` is set), not started;
    returns it and its bound port."""
    rejects = Rejects(CollectorRegistry(), log)  # no metrics port here: counted for the log only
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if predict_token:
        interceptors.append(AioControlPlaneAuth([TokenRule(predict_token, full_names(SERVICE_NAME, PREDICT))],
                                                on_refusal=rejects.refused))
    interceptors.append(AioDecodeGuard(rejects))
    server = grpc.aio.server(options=channel_options(max_message_bytes), interceptors=interceptors)
    inference_pb2_grpc.add_InferenceGatewayServicer_to_server(proxy, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server, bind(server, f"{host}:{port}", tls)


@dataclass
class StaticCatalog:
    """Packages read once at start (the standalone proxy)."""

    models: dict[str, dict[int, ModelSpec]] = field(default_factory=dict)

    def specs(self) -> Mapping[str, Mapping[int, ModelSpec]]:
        return self.models


def main(argv: list[str] | None = None) -> int:
    """`python -m inference_gateway.predict_proxy --target HOST:PORT --model PKG ...`: the proxy alone in
    front of any server of serve's OIP schema; prints one JSON line with its port, drains on SIGTERM."""
    from pathlib import Path

    from inference_gateway.shared_tables import serving_facts
    from protos.package import load_package

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--target", required=True, help="HOST:PORT of the Open Inference Protocol server")
    p.add_argument("--model", action="append", default=[], help="package directory the target serves (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--predict-token-file", help="bearer token Predict / PredictStream need")
    p.add_argument("--tls-cert", help="PEM certificate (chain): serve TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA of client certificates: mutual TLS")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    catalog = StaticCatalog()
    for path in args.model:
        facts = {**serving_facts(load_package(path, read_tables=False)), "path": str(Path(path).resolve())}
        catalog.models.setdefault(facts["name"], {})[int(facts["version"])] = ModelSpec(facts)
    token = read_token(args.predict_token_file, None, "predict token")
    tls = TlsConfig.from_paths(args.tls_cert, args.tls_key, args.tls_client_ca)

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        proxy = PredictProxy(catalog, args.target)
        server, port = add_to_server(proxy, args.host, args.port, token, tls)
        await server.start()
        print(json.dumps({"event": "serving", "service": SERVICE_NAME, "host": args.host, "port": port,
                          "target": args.target, "pid": os.getpid()}), flush=True)
        await stop.wait()
        await server.stop(5)
        await proxy.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
