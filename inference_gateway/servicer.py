"""The InferenceGateway service on grpc.aio: decode and validate on the event loop, score on the
batching workers, answer when the batch is done.

Errors are gRPC statuses naming the field (unary) or a `PredictResponse.error` (stream, which goes
on). Nothing a request does changes server state unless it is a model-management call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from inference_gateway.admission import Admission, AdmissionConfig, Refused
from inference_gateway.batching import Batcher, BatchingConfig, Expired, Overloaded, Pending
from inference_gateway.control_plane import SERVICE_NAME, load_path
from inference_gateway.metrics import GatewayMetrics
from inference_gateway.model import ServingModel
from inference_gateway.registry import LoadedModel, ModelRegistry
from inference_gateway.requests import Decoded, Limits, RequestError, decode
from inference_gateway.streams import answers
from protos import common_pb2, inference_pb2, inference_pb2_grpc
from protos.package import PackageError
from protos.paths import PathRefused, status_of_oserror

log = logging.getLogger(__name__)
access = logging.getLogger("inference_gateway.access")
OK = grpc.StatusCode.OK
METHODS = ("Predict", "PredictStream", "ModelInfer")  # every way a request reaches the batchers


class GatewayServicer(inference_pb2_grpc.InferenceGatewayServicer):
    def __init__(self, *, limits: Limits, batching: BatchingConfig, metrics: GatewayMetrics,
                 health_servicer: health.aio.HealthServicer, device: str = "cpu", access_log: bool = False,
                 model_store: str = "model_store", admission: AdmissionConfig | None = None) -> None:
        self.limits, self.metrics, self.health = limits, metrics, health_servicer
        self.admission = Admission(admission or AdmissionConfig())
        self.draining = False  # set by the server when SIGTERM starts the drain
        self.model_store = model_store  # LoadModel reads packages only under it
        self.access_log = access_log
        self.loop: asyncio.AbstractEventLoop | None = None
        self.registry = ModelRegistry(batching, self._deliver, device, make_batcher=self._make_batcher)
        self._ok = {m: metrics.requests.labels(m, "OK") for m in METHODS}
        self._latency = {m: metrics.latency.labels(m) for m in METHODS}
        self._refused = {r: metrics.admission_refusals.labels(r) for r in ("max_queue_wait", "deadline")}
        metrics.queue_depth.set_function(self.registry.queued_samples)

    def _make_batcher(self, model: ServingModel) -> Batcher:
        m = self.metrics
        expired = m.rejects.labels("deadline")

        def observe(samples: int, requests: int, seconds: float) -> None:
            m.batch_size.observe(samples)
            m.batch_requests.observe(requests)
            m.compute.observe(seconds)

        return Batcher(model, self.registry.batching, self._deliver, observe=observe, on_expired=expired.inc)

    # -- results from the batching workers -------------------------------------------------------
    def _deliver(self, results: list[tuple[Any, Any]]) -> None:
        self.loop.call_soon_threadsafe(_resolve, results)

    # -- prediction ------------------------------------------------------------------------------
    def _submit(self, req: inference_pb2.PredictRequest,
                deadline: float | None) -> tuple[LoadedModel, asyncio.Future]:
        """Resolve, validate and queue; the future completes with the scores (or an error)."""
        loaded = self.registry.resolve(req.model, req.version)
        self.admit(loaded, deadline)
        return loaded, self.queue(loaded, decode(req, loaded.model, self.limits), deadline)

    def admit(self, loaded: LoadedModel, deadline: float | None) -> None:
        """Admission, before any decoding (a refusal must cost little): the expected wait against the
        bound and the deadline; RequestError(RESOURCE_EXHAUSTED) when refused."""
        batcher = loaded.batcher
        try:
            cfg = batcher.config
            self.admission.check(batcher.queued_samples, batcher.batch_time, cfg.max_batch_size, cfg.workers,
                                 batcher.busy, None if deadline is None else deadline - time.monotonic())
        except Refused as e:
            self._refused[e.reason].inc()
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {loaded.model.name} "
                                                                   f"v{loaded.model.version}: {e.message}") from None

    def queue(self, loaded: LoadedModel, decoded: Decoded, deadline: float | None) -> asyncio.Future:
        """Into the batcher (after `admit`); the future completes with the scores (or an error)."""
        fut = self.loop.create_future()
        try:
            loaded.batcher.submit(Pending(decoded, deadline, fut))
        except Overloaded as e:
            self.metrics.rejects.labels("queue_full").inc()
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {loaded.model.name} "
                                                                   f"v{loaded.model.version}: {e}") from None
        return fut

    @staticmethod
    def scores(fut: asyncio.Future):
        """The scores of a completed future; RequestError for what failed after queueing."""
        exc = fut.exception()
        if isinstance(exc, Expired):
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued; dropped before "
                                                                  "compute")
        if exc is not None:
            raise RequestError(grpc.StatusCode.INTERNAL, f"scoring failed: {type(exc).__name__}: {exc}")
        return fut.result()

    def _response(self, req: inference_pb2.PredictRequest, loaded: LoadedModel,
                  fut: asyncio.Future) -> inference_pb2.PredictResponse:
        scores = self.scores(fut)
        return inference_pb2.PredictResponse(
            scores=common_pb2.Tensor(dtype=common_pb2.FLOAT32, shape=[len(scores)], data=scores.tobytes()),
            model=loaded.model.name, version=loaded.model.version, request_id=req.request_id)

    def _record(self, method: str, start: float, code: grpc.StatusCode, req, resp=None, message: str = "") -> None:
        self.record(method, start, code, lambda: {
            "request_id": req.request_id, "model": resp.model if resp else req.model,
            "version": resp.version if resp else req.version,
            "samples": req.dense.shape[0] if req.dense.shape else 0}, message)

    def record(self, method: str, start: float, code: grpc.StatusCode, fields, message: str = "") -> None:
        """Latency and status metrics, and the access-log line (`fields()` only when it is on)."""
        elapsed = time.perf_counter() - start
        self._latency[method].observe(elapsed)
        if code is OK:
            self._ok[method].inc()
        else:
            self.metrics.requests.labels(method, code.name).inc()
        if self.access_log:
            entry = {"method": method, **fields(), "code": code.name, "ms": round(elapsed * 1000, 3)}
            if message:
                entry["error"] = message
            access.info(json.dumps(entry))

    async def Predict(self, request, context):
        start = time.perf_counter()
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            loaded, fut = self._submit(request, deadline)
            with contextlib.suppress(Exception):  # read by _response; a client that leaves cancels `fut`
                await fut
            resp = self._response(request, loaded, fut)
        except RequestError as e:
            self._record("Predict", start, e.code, request, message=e.message)
            context.set_code(e.code)
            context.set_details(e.message)
            return inference_pb2.PredictResponse()
        self._record("Predict", start, OK, request, resp)
        return resp

    async def PredictStream(self, request_iterator, context):
        """Each message is queued as it arrives and answered when its batch is done (no task per message);
        a bad message gets a response with `error` set and the stream goes on."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        out: asyncio.Queue = asyncio.Queue()
        state = {"in_flight": 0, "reading": True}

        def answer(req, start: float, loaded: LoadedModel | None, fut: asyncio.Future | None,
                   error: RequestError | None = None) -> None:
            try:
                if error is not None:
                    raise error
                resp = self._response(req, loaded, fut)
                self._record("PredictStream", start, OK, req, resp)
            except RequestError as e:
                self._record("PredictStream", start, e.code, req, message=e.message)
                resp = inference_pb2.PredictResponse(request_id=req.request_id, error=inference_pb2.Status(
                    code=e.code.value[0], message=e.message))
            state["in_flight"] -= 1
            out.put_nowait(resp)
            if not state["reading"] and state["in_flight"] == 0:
                out.put_nowait(None)

        async def read() -> None:
            async for req in request_iterator:
                start = time.perf_counter()
                state["in_flight"] += 1
                try:
                    loaded, fut = self._submit(req, deadline)
                except RequestError as e:
                    answer(req, start, None, None, e)
                    continue
                fut.add_done_callback(lambda f, req=req, start=start, loaded=loaded: answer(req, start, loaded, f))
            state["reading"] = False
            if state["in_flight"] == 0:
                out.put_nowait(None)

        async with contextlib.aclosing(answers(read(), out)) as stream:
            async for resp in stream:
                yield resp

    # -- model management ------------------------------------------------------------------------
    async def _publish_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if len(self.registry) else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.metrics.models.set(len(self.registry))

    async def load(self, path: str, name: str = "", version: int = 0, make_default: bool = False) -> LoadedModel:
        loaded = await asyncio.to_thread(self.registry.load, path, name, version, make_default)
        await self._publish_health()
        log.info("loaded model %s v%d from %s", loaded.model.name, loaded.model.version, path)
        return loaded

    async def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(models=self.registry.infos())

    async def LoadModel(self, request, context):
        try:
            path = load_path(request, self.model_store)
            loaded = await self.load(str(path), request.name, request.version, request.make_default)
        except PathRefused as e:
            await context.abort(e.code, e.message)
        except OSError as e:  # never INTERNAL: a missing package, a full disk, no permission ...
            refused = status_of_oserror(e, "path", request.path)
            await context.abort(refused.code, refused.message)
        except PackageError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"path: package refused: {e}")
        except RequestError as e:
            await context.abort(e.code, e.message)
        except (ValueError, RuntimeError) as e:  # e.g. device: cuda on a host without one
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"path: {request.path}: cannot serve it "
                                                                     f"({type(e).__name__}: {e})")
        return self._info(loaded)

    def _info(self, loaded: LoadedModel) -> inference_pb2.ModelInfo:
        m = loaded.model
        return next(i for i in self.registry.infos() if i.name == m.name and i.version == m.version)

    async def UnloadModel(self, request, context):
        try:
            loaded = self.registry.unload(request.name, request.version)
        except RequestError as e:
            await context.abort(e.code, e.message)
        await asyncio.to_thread(loaded.batcher.close)  # every request already queued is answered first
        await self._publish_health()
        log.info("unloaded model %s v%d", request.name, request.version)
        return inference_pb2.UnloadModelResponse()

    async def SetDefaultVersion(self, request, context):
        try:
            loaded = self.registry.set_default(request.name, request.version)
        except RequestError as e:
            await context.abort(e.code, e.message)
        log.info("default of model %s is now v%d", request.name, request.version)
        return self._info(loaded)


def _resolve(results: list[tuple[Any, Any]]) -> None:
    for fut, res in results:
        if fut.done():  # the client went away (cancelled)
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)
