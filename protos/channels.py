"""Opening gRPC channels, the same way for every client of the project.

Both ends of every channel configure the largest message they send and accept (DESIGN.md's wire
format); servers pass the same `channel_options` to their `grpc.server`. TLS is used when the client
is given the CA that signed the server's certificate (`protos.security` holds the server side).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from protos.security import read_pem

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def open_channel(address: str, *, tls_ca: str | None = None, max_message_bytes: int | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A TLS channel verified against the CA in `tls_ca` (PEM path), or a plaintext one without it;
    `max_message_bytes` sets both message limits, `options` adds any other channel argument."""
    opts = [*(channel_options(max_message_bytes) if max_message_bytes else []), *options]
    if tls_ca is None:
        return grpc.insecure_channel(address, options=opts)
    creds = grpc.ssl_channel_credentials(root_certificates=read_pem(tls_ca, "tls ca"))
    return grpc.secure_channel(address, creds, options=opts)
