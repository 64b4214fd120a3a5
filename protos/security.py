"""TLS and bearer tokens, the same way for every server and client of the project.

Servers bind through `bind` (TLS when a certificate is configured, plaintext otherwise, as on
loopback); clients open channels through `protos.channels.open_channel` (TLS when given the CA that
signed the server's certificate). Admin RPCs (ApplyPlan, Rollback, ...) additionally require a bearer token,
checked by `BearerTokenInterceptor` in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

AUTHORIZATION = "authorization"


def read_pem(path: str, what: str) -> bytes:
    """The bytes of a PEM file; an unreadable one is an OSError naming `what` and the path."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"{what} {path!r}: {e.strerror or e}") from None


@dataclass(frozen=True)
class TlsConfig:
    """Paths of the server's PEM certificate (chain) and private key."""

    cert: str
    key: str

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(read_pem(self.key, "tls key"), read_pem(self.cert, "tls cert"))])

    @classmethod
    def from_paths(cls, cert: str | None, key: str | None) -> TlsConfig | None:
        """None when neither is given; both or neither, so a half-configured server never starts plaintext."""
        if not cert and not key:
            return None
        if not cert:
            raise ValueError("tls_cert: required when tls_key is given")
        if not key:
            raise ValueError("tls_key: required when tls_cert is given")
        return cls(str(cert), str(key))


def bind(server: grpc.Server, address: str, tls: TlsConfig | None) -> int:
    """Adds a secure (tls) or plaintext port; returns the bound port (useful with port 0)."""
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, tls.server_credentials())
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token, for `stub.Method(req, metadata=bearer_metadata(token))`."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses every call with (code, message)."""

    def refuse(_request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kw)
    return grpc.unary_unary_rpc_method_handler(refuse, **kw)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on the protected methods (full names, e.g.
    "/recsys.v1.Coordinator/ApplyPlan"); every other method passes untouched."""

    def __init__(self, token: str, protected: Iterable[str]) -> None:
        if not token:
            raise ValueError("token: empty (an empty token would protect nothing)")
        self._token = token.encode()
        self.protected = frozenset(protected)
        for method in self.protected:
            if not method.startswith("/") or method.count("/") != 2:
                raise ValueError(f"protected: {method!r} is not a full method name like '/package.Service/Method'")

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method not in self.protected:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        values = [v for k, v in handler_call_details.invocation_metadata or () if k == AUTHORIZATION]
        scheme, _, given = (values[0] if values else "").partition(" ")
        if not values or scheme.lower() != "bearer" or not given:
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, f"missing bearer token for {method}")
        given_bytes = given.strip().encode() if isinstance(given, str) else given
        if not hmac.compare_digest(given_bytes, self._token):
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED, f"wrong bearer token for {method}")
        return handler
