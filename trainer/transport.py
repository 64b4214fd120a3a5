"""Transports between a trainer and the shards. gRPC: async fan-out to every shard, works across hosts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import torch

from embedding_service.client import LookupResult, ShardClient
from trainer.router import ShardRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


class ShardUnavailable(RuntimeError):
    """A shard did not answer after every retry; names the shard and the plan version."""


class GrpcTransport:
    def __init__(self, addresses: list[str], *, plan_version: int, trainer_id: int = 0,
                 wire_dtype: torch.dtype = torch.float32, retries: int = 5, backoff_s: float = 0.2,
                 timeout_s: float = 120.0) -> None:
        self.addresses = addresses
        self.plan_version = plan_version
        self.trainer_id = trainer_id
        self.wire_dtype = wire_dtype
        self.retries = retries
        self.backoff_s = backoff_s
        self.clients = [ShardClient(a, plan_version=plan_version, timeout=timeout_s) for a in addresses]

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def _retry(self, shard: int, what: str, call: Callable[[], T]) -> T:
        """Retries only UNAVAILABLE (the request never reached the shard), with exponential backoff."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        raise ShardUnavailable(
                            f"shard {shard} at {self.addresses[shard]} unavailable for {what} after "
                            f"{self.retries + 1} attempts (plan version {self.plan_version}): {e.details()}") from None
                    raise
                log.warning("shard %d unavailable for %s (attempt %d): retrying in %.2fs", shard, what, attempt + 1,
                            delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def lookup_async(self, requests: dict[int, ShardRequest], step: int,
                     no_grad: bool = False) -> dict[int, Pending]:
        """Sends every shard its request at once; `Pending.result()` gathers, resending if unreachable."""
        out = {}
        for shard, req in requests.items():
            batch = req.lengths.numel() // len(req.features)

            def send(shard=shard, req=req, batch=batch) -> grpc.Future:
                return self.clients[shard].lookup_async(
                    req.features, batch, req.lengths, req.values, req.weights, trainer_id=self.trainer_id,
                    step=step, no_grad=no_grad, wire_dtype=self.wire_dtype)

            out[shard] = Pending(self, shard, f"lookup of step {step}", send)
        return out

    def lookup(self, requests: dict[int, ShardRequest], step: int, no_grad: bool = False) -> dict[int, LookupResult]:
        return {s: p.result() for s, p in self.lookup_async(requests, step, no_grad).items()}

    def update_async(self, handles: dict[int, str], grads: dict[int, torch.Tensor], step: int) -> dict[int, Pending]:
        out = {}
        for shard in handles:
            def send(shard=shard) -> grpc.Future:
                return self.clients[shard].update_async(handles[shard], grads[shard], wire_dtype=self.wire_dtype)

            out[shard] = Pending(self, shard, f"update of step {step}", send)
        return out


class Pending:
    """An RPC in flight to one shard; resent (with backoff) while the shard is UNAVAILABLE."""

    def __init__(self, transport: GrpcTransport, shard: int, what: str, send: Callable[[], grpc.Future]) -> None:
        self.transport, self.shard, self.what, self._send = transport, shard, what, send
        self._future: grpc.Future | None = send()

    def result(self):
        def call():
            fut = self._future if self._future is not None else self._send()
            self._future = None
            return fut.result()

        return self.transport._retry(self.shard, self.what, call)
