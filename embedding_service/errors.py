"""One exception type that carries the gRPC status a bad request deserves."""

from __future__ import annotations

import grpc


class ShardError(Exception):
    """Raised before any state changes; the servicer turns it into `code` with this message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ShardError:
    return ShardError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ShardError:
    return ShardError(grpc.StatusCode.NOT_FOUND, message)


def precondition(message: str) -> ShardError:
    return ShardError(grpc.StatusCode.FAILED_PRECONDITION, message)


def data_loss(message: str) -> ShardError:
    return ShardError(grpc.StatusCode.DATA_LOSS, message)
