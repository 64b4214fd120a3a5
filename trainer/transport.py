"""Transports between a trainer and the shards. gRPC: async fan-out to every shard, works across hosts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch
import torch.distributed as dist

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


@dataclass
class _Done:
    """A finished exchange, shaped like `Pending` for the training loop."""

    value: object = None

    def result(self):
        return self.value


class CollectiveTransport:
    """Ids, embeddings and gradients through `all_to_all_single` in the job's torch.distributed group
    (see embedding_service/collective.py for the protocol). Trainers are ranks 0..T-1, shard s is rank
    T+s. Exchanges are blocking and in step order, so the loop runs non-pipelined on this transport."""

    def __init__(self, num_trainers: int, num_shards: int) -> None:
        self.trainers, self.shards = num_trainers, num_shards
        self.world = num_trainers + num_shards
        self.dims: dict[int, int] = {}

    def _a2a(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int],
             dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(sum(recv_splits), dtype=dtype)
        dist.all_to_all_single(out, send, output_split_sizes=recv_splits, input_split_sizes=send_splits)
        return out

    def _shard_splits(self, per_shard: dict[int, int]) -> list[int]:
        return [0] * self.trainers + [per_shard.get(s, 0) for s in range(self.shards)]

    def lookup_async(self, requests: dict[int, ShardRequest], step: int, no_grad: bool = False) -> dict[int, _Done]:
        if no_grad:
            raise ValueError("collective transport: evaluation lookups go over gRPC")
        header = torch.zeros(self.world, 3, dtype=torch.int64)
        for s, req in requests.items():
            header[self.trainers + s] = torch.tensor([req.lengths.numel(), req.values.numel(), step])
        self._a2a(header.flatten(), [3] * self.world, [3] * self.world, torch.int64)
        order = sorted(requests)
        self._a2a(torch.cat([requests[s].lengths.to(torch.int64) for s in order]),
                  self._shard_splits({s: requests[s].lengths.numel() for s in order}), [0] * self.world, torch.int64)
        self._a2a(torch.cat([requests[s].values.to(torch.int64) for s in order]),
                  self._shard_splits({s: requests[s].values.numel() for s in order}), [0] * self.world, torch.int64)
        batch = {s: requests[s].lengths.numel() // len(requests[s].features) for s in order}
        sizes = {s: batch[s] * sum(requests[s].dims) for s in order}
        emb = self._a2a(torch.empty(0), [0] * self.world, self._shard_splits(sizes), torch.float32)
        parts = torch.split(emb, [sizes[s] for s in order])
        return {s: _Done(LookupResult("", p.view(batch[s], -1), list(requests[s].dims)))
                for s, p in zip(order, parts, strict=True)}

    def update_async(self, handles: dict[int, str], grads: dict[int, torch.Tensor], step: int) -> dict[int, _Done]:
        order = sorted(grads)
        self._a2a(torch.cat([grads[s].reshape(-1).float() for s in order]),
                  self._shard_splits({s: grads[s].numel() for s in order}), [0] * self.world, torch.float32)
        return {s: _Done() for s in order}

    def stop(self) -> None:
        """Tells the shards' collective loops that the job is over."""
        header = torch.zeros(self.world, 3, dtype=torch.int64)
        header[self.trainers :, 2] = -1
        self._a2a(header.flatten(), [3] * self.world, [3] * self.world, torch.int64)
