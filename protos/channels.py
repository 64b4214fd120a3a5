"""Opening gRPC channels, the same way for every client of the project.

Both ends of every channel configure the largest message they send and accept (DESIGN.md's wire
format); servers pass the same `channel_options` to their `grpc.server`. TLS is used when the client
is given the CA that signed the server's certificate (`protos.security` holds the server side).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import grpc

from protos.security import read_pem

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# gRPC's status codes by their wire number: what grpc-status, a PredictResponse's error.code and the native
# frontend's counters carry
STATUS_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_name(number: int) -> str:
    """The name of the gRPC status code numbered `number` (the number itself when gRPC defines none)."""
    code = STATUS_BY_NUMBER.get(number)
    return code.name if code is not None else str(number)


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def open_channel(address: str, *, tls_ca: str | None = None, max_message_bytes: int | None = None,
                 options: Sequence[tuple[str, Any]] = (), tls_cert: str | None = None,
                 tls_key: str | None = None) -> grpc.Channel:
    """A TLS channel verified against the CA in `tls_ca` (PEM path), or a plaintext one without it;
    with `tls_cert` / `tls_key` (PEM paths) the client presents its own certificate (mutual TLS).
    `max_message_bytes` sets both message limits, `options` adds any other channel argument."""
    opts = [*(channel_options(max_message_bytes) if max_message_bytes else []), *options]
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key: both or neither (a client certificate needs its key)")
    if tls_ca is None:
        if tls_cert:
            raise ValueError("tls_cert: a client certificate needs TLS; give tls_ca too")
        return grpc.insecure_channel(address, options=opts)
    pair = {}
    if tls_cert and tls_key:
        pair = {"private_key": read_pem(tls_key, "tls key"), "certificate_chain": read_pem(tls_cert, "tls cert")}
    creds = grpc.ssl_channel_credentials(root_certificates=read_pem(tls_ca, "tls ca"), **pair)
    return grpc.secure_channel(address, creds, options=opts)


class ChannelClient:
    """A client of the project's services over one channel (`self.channel`, set by the subclass): `with`
    closes it."""

    channel: grpc.Channel

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()
