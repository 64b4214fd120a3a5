"""TLS, mutual TLS and bearer tokens, the same way for every server and client of the project.

Every server splits its RPCs into a data plane (Lookup, Update, Predict, Register, Heartbeat, reads)
and a control plane (anything that checkpoints, restores, loads, stages, moves or commits rows, or
changes a plan or a model version). Control-plane RPCs need a credential:

- a bearer token (`--token-file` or an env var; `authorization: Bearer <token>`), checked by
  `ControlPlaneAuth` in constant time: missing -> UNAUTHENTICATED, wrong -> PERMISSION_DENIED. A token
  is never logged, counted or echoed: refusals name the method only;
- and/or mutual TLS (`TlsConfig.client_ca`): the server requires a client certificate signed by that
  CA at the handshake, so with mTLS on every RPC, data plane included, is authenticated.

Servers bind through `bind` (TLS when a certificate is configured, plaintext otherwise, as on
loopback); clients open channels through `protos.channels.open_channel` (TLS when given the CA that
signed the server's certificate, presenting their own certificate when given one).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

AUTHORIZATION = "authorization"
CONTROL_TOKEN_ENV = "RECSYS_CONTROL_TOKEN"  # the control-plane token of shards and gateways (and their clients)


def write_self_signed(directory: Path, name: str) -> tuple[str, str]:
    """A fresh P-256 certificate for localhost and 127.0.0.1, its own CA, valid a day: the paths of
    `<name>.crt` and `<name>.key` in `directory`. For loopback TLS in tests and benchmarks (a client trusts
    it with the certificate itself as its root), never for a deployment."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = Path(directory) / f"{name}.crt", Path(directory) / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def read_pem(path: str, what: str) -> bytes:
    """The bytes of a PEM file; an unreadable one is an OSError naming `what` and the path."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"{what} {path!r}: {e.strerror or e}") from None


def read_token(token_file: str | None = None, env: str | None = None, what: str = "token") -> str | None:
    """The token in `token_file` (stripped), else in the environment variable `env`, else None.
    An empty or unreadable file is an error naming the file, never the token."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise OSError(f"{what} file {token_file!r}: {e.strerror or e}") from None
        if not token:
            raise ValueError(f"{what} file {token_file!r}: empty")
        return token
    if env:
        return os.environ.get(env, "").strip() or None
    return None


@dataclass(frozen=True)
class TlsConfig:
    """Paths of the server's PEM certificate (chain) and private key, and optionally of the CA that
    signs client certificates (mutual TLS: a client without such a certificate fails the handshake)."""

    cert: str
    key: str
    client_ca: str | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        pair = [(read_pem(self.key, "tls key"), read_pem(self.cert, "tls cert"))]
        if self.client_ca:
            return grpc.ssl_server_credentials(pair, root_certificates=read_pem(self.client_ca, "tls client ca"),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials(pair)

    @classmethod
    def from_paths(cls, cert: str | None, key: str | None, client_ca: str | None = None) -> TlsConfig | None:
        """None when neither is given; both or neither, so a half-configured server never starts plaintext."""
        if not cert and not key:
            if client_ca:
                raise ValueError("tls_client_ca: needs tls_cert and tls_key (mutual TLS is TLS)")
            return None
        if not cert:
            raise ValueError("tls_cert: required when tls_key is given")
        if not key:
            raise ValueError("tls_key: required when tls_cert is given")
        return cls(str(cert), str(key), str(client_ca) if client_ca else None)


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


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
            aio: bool = False) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses every call with (code, message)."""

    def refuse(_request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    async def refuse_aio(_request_or_iterator: Any, context: Any) -> Any:
        await context.abort(code, message)

    if aio:
        refuse = refuse_aio  # type: ignore[assignment]

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
        refusal = check_bearer(self._token, handler_call_details)
        if refusal is None:
            return handler
        return _denied(handler, *refusal)


def check_bearer(token: bytes, details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str] | None:
    """None when the call carries `authorization: Bearer <token>`; else the refusal (code, message).
    Constant-time comparison; the message names the method, never what was sent."""
    method = details.method
    values = [v for k, v in details.invocation_metadata or () if k == AUTHORIZATION]
    scheme, _, given = (values[0] if values else "").partition(" ")
    if not values or scheme.lower() != "bearer" or not given:
        return grpc.StatusCode.UNAUTHENTICATED, f"missing bearer token for {method}"
    given_bytes = given.strip().encode() if isinstance(given, str) else given
    if not hmac.compare_digest(given_bytes, token):
        return grpc.StatusCode.PERMISSION_DENIED, f"wrong bearer token for {method}"
    return None


Refused = Callable[[str, str], None]  # (method, status name): counts a refusal in a server's metrics


@dataclass(frozen=True)
class TokenRule:
    """Methods (full names) that need `token`."""

    token: str
    methods: frozenset[str]


class ControlPlaneAuth(grpc.ServerInterceptor):
    """Bearer tokens by method for a thread-pool server: each `TokenRule` protects its methods (the
    control plane with the control token, Predict with a predict token, ...); other methods pass.
    `on_refusal(method, code)` counts refusals (the token is never passed to it)."""

    def __init__(self, rules: Iterable[TokenRule], on_refusal: Refused | None = None) -> None:
        self._rules: dict[str, bytes] = {}
        for rule in rules:
            if not rule.token:
                raise ValueError("token: empty (an empty token would protect nothing)")
            for method in rule.methods:
                if not method.startswith("/") or method.count("/") != 2:
                    raise ValueError(f"protected: {method!r} is not a full method name like '/package.Service/Method'")
                self._rules[method] = rule.token.encode()
        self.protected = frozenset(self._rules)
        self._on_refusal = on_refusal

    def _refusal(self, details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str] | None:
        token = self._rules.get(details.method)
        if token is None:
            return None
        refusal = check_bearer(token, details)
        if refusal is not None and self._on_refusal is not None:
            self._on_refusal(details.method, refusal[0].name)
        return refusal

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        refusal = self._refusal(handler_call_details)
        return handler if refusal is None else _denied(handler, *refusal)


class AioControlPlaneAuth(grpc.aio.ServerInterceptor):
    """`ControlPlaneAuth` for grpc.aio servers (the gateway)."""

    def __init__(self, rules: Iterable[TokenRule], on_refusal: Refused | None = None) -> None:
        self._sync = ControlPlaneAuth(rules, on_refusal)
        self.protected = self._sync.protected

    async def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        refusal = self._sync._refusal(handler_call_details)
        return handler if refusal is None else _denied(handler, *refusal, aio=True)


def full_names(service: str, methods: Iterable[str]) -> frozenset[str]:
    """"/package.Service/Method" for each method of `service` ("package.Service")."""
    return frozenset(f"/{service}/{m}" for m in methods)
