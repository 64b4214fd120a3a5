"""Rejected requests are counted, and logged at most once per interval, never with a traceback each.

A port open to the network receives garbage and unauthenticated calls; logging each with a traceback
(gRPC's own "Exception deserializing message!" at ERROR) lets anyone fill the disk and bury real
errors. Every server of the project therefore:

- decodes requests through `DecodeGuard` (thread-pool servers) or `AioDecodeGuard` (grpc.aio): a
  message that does not parse is answered INVALID_ARGUMENT naming the message type, counted in
  `rpc_rejected_total{method, reason="undecodable"}` and logged through a `RateLimitedLog`;
- counts credential refusals in the same metric (`reason` = UNAUTHENTICATED / PERMISSION_DENIED);
- filters gRPC's own deserialization log records (`quiet_grpc_decode_logs`) as a backstop for
  handlers outside the guard (health, reflection): counted, not logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

UNDECODABLE = "undecodable"


class RateLimitedLog:
    """Logs a message of a kind at most once per `interval_s`, with how many were suppressed since."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, level: int = logging.WARNING) -> None:
        self.logger, self.interval_s, self.level = logger, interval_s, level
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, kind: str, message: str, *args: Any) -> bool:
        """Logs (no traceback) unless a `kind` message was logged less than `interval_s` ago; True if logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (%d more like it in the last %.0f s, not logged)"
            args = (*args, suppressed, self.interval_s)
        self.logger.log(self.level, message, *args)
        return True


class Rejects:
    """`rpc_rejected_total{method, reason}` in a server's registry plus a rate-limited log of rejections."""

    def __init__(self, registry: CollectorRegistry, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.counter = Counter("rpc_rejected", "requests rejected before reaching a handler (undecodable, "
                               "unauthenticated, permission denied)", ["method", "reason"], registry=registry)
        self.log = RateLimitedLog(logger, interval_s)

    def reject(self, method: str, reason: str, detail: str = "") -> None:
        self.counter.labels(method, reason).inc()
        self.log.log(f"{method}:{reason}", "rejected %s request to %s%s", reason, method,
                     f": {detail}" if detail else "")

    def refused(self, method: str, code: str) -> None:
        """The `on_refusal` callback of `protos.security.ControlPlaneAuth` (never sees the token)."""
        self.reject(method, code)


class _Undecodable:
    """What a guarded deserializer returns for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as e:  # any parse failure is the client's malformed message
            return _Undecodable(f"malformed {type_name}: {type(e).__name__}: {e}"[:300])

    return parse


def _type_name(handler: grpc.RpcMethodHandler) -> str:
    owner = getattr(handler.request_deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "name", None) or "request"


def _kind(handler: grpc.RpcMethodHandler) -> tuple[Any, Callable]:
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


class DecodeGuard(grpc.ServerInterceptor):
    """Answers an undecodable request INVALID_ARGUMENT (counted, rate-limited log) instead of letting gRPC
    log a traceback and answer INTERNAL. Thread-pool servers. `exempt`: full method names whose own
    parsers never raise (the shard's hand-framed Lookup / Update), left unwrapped on the hot path.
    The guarded handler of a method is built once and reused while the server hands out the same
    handler (every call, for registered services): no closures or handler tuples per call."""

    def __init__(self, rejects: Rejects, exempt: frozenset[str] = frozenset()) -> None:
        self.rejects, self.exempt = rejects, exempt
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler_call_details.method in self.exempt:
            return handler
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self._guard(method, handler)
        self._guarded[method] = (handler, guarded)
        return guarded

    def _guard(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior, make = _kind(handler)
        rejects = self.rejects

        def refuse(bad: _Undecodable, context: grpc.ServicerContext) -> None:
            rejects.reject(method, UNDECODABLE, bad.error)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.error)

        def checked(iterator: Any, context: grpc.ServicerContext) -> Any:
            for item in iterator:
                if isinstance(item, _Undecodable):
                    refuse(item, context)
                yield item

        if handler.request_streaming:
            def wrapped(request_iterator: Any, context: grpc.ServicerContext) -> Any:
                return behavior(checked(request_iterator, context), context)
        elif handler.response_streaming:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    refuse(request, context)
                yield from behavior(request, context)
        else:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    refuse(request, context)
                return behavior(request, context)

        return make(wrapped, request_deserializer=_safe(handler.request_deserializer, _type_name(handler)),
                    response_serializer=handler.response_serializer)


class AioDecodeGuard(grpc.aio.ServerInterceptor):
    """`DecodeGuard` for grpc.aio servers (handlers are coroutines or async generators)."""

    def __init__(self, rejects: Rejects) -> None:
        self.rejects = rejects

    async def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        behavior, make = _kind(handler)
        rejects = self.rejects

        async def refuse(bad: _Undecodable, context: Any) -> None:
            rejects.reject(method, UNDECODABLE, bad.error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.error)

        async def checked(iterator: Any, context: Any) -> Any:
            async for item in iterator:
                if isinstance(item, _Undecodable):
                    await refuse(item, context)
                yield item

        if handler.request_streaming and handler.response_streaming:
            async def wrapped(request_iterator: Any, context: Any) -> Any:
                async for resp in behavior(checked(request_iterator, context), context):
                    yield resp
        elif handler.request_streaming:
            async def wrapped(request_iterator: Any, context: Any) -> Any:
                return await behavior(checked(request_iterator, context), context)
        elif handler.response_streaming:
            async def wrapped(request: Any, context: Any) -> Any:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for resp in behavior(request, context):
                    yield resp
        else:
            async def wrapped(request: Any, context: Any) -> Any:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                return await behavior(request, context)

        return make(wrapped, request_deserializer=_safe(handler.request_deserializer, _type_name(handler)),
                    response_serializer=handler.response_serializer)


class _GrpcDecodeFilter(logging.Filter):
    def __init__(self, on_drop: Callable[[], None] | None) -> None:
        super().__init__()
        self.on_drop = on_drop

    def filter(self, record: logging.LogRecord) -> bool:
        if "deserializing" in str(record.msg):
            if self.on_drop is not None:
                self.on_drop()
            return False
        return True


def quiet_grpc_decode_logs(on_drop: Callable[[], None] | None = None) -> None:
    """Drops gRPC's own per-request "Exception deserializing ..." records (with their tracebacks)."""
    for name in ("grpc._common", "grpc._server", "grpc._cython.cygrpc", "grpc.aio._server"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _GrpcDecodeFilter) for f in logger.filters):
            logger.addFilter(_GrpcDecodeFilter(on_drop))
