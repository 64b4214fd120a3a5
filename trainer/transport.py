"""Transports between a trainer and the shards. gRPC: async fan-out to every shard, works across hosts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import torch

from protos.collective import PAUSE, STOP, exchange, status_round
from protos.shard_client import LookupResult, ShardClient
from trainer.router import ShardRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


class ShardCallFailed(RuntimeError):
    """An RPC to a shard failed for good; names the shard, its address, the call and the gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class ShardUnavailable(ShardCallFailed):
    """A shard did not answer after every retry; names the shard and the plan version."""


class GrpcTransport:
    def __init__(self, addresses: list[str], *, plan_version: int, trainer_id: int = 0,
                 wire_dtype: torch.dtype = torch.float32, retries: int = 5, backoff_s: float = 0.2,
                 timeout_s: float = 120.0, tls_ca: str | None = None, token: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, trainer_epoch: int = 0,
                 member_check: Callable[[], None] | None = None) -> None:
        """`member_check` raises once the coordinator replaced this trainer (its epoch superseded): called
        before every lookup and update, so a trainer woken after its replacement sends no write."""
        self.addresses = addresses
        self.plan_version = plan_version
        self.trainer_id = trainer_id
        self.wire_dtype = wire_dtype
        self.retries = retries
        self.timeout_s = timeout_s
        self.member_check = member_check
        self.backoff_s = backoff_s
        self.clients = [ShardClient(a, plan_version=plan_version, timeout=timeout_s, tls_ca=tls_ca, token=token,
                                    tls_cert=tls_cert, tls_key=tls_key, trainer_epoch=trainer_epoch)
                        for a in addresses]

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def call(self, shard: int, what: str, call: Callable[[], T]) -> T:
        """One RPC to shard `shard` (`what` names it in errors: "lookup of step 7", "checkpoint of step 39").
        Retries only UNAVAILABLE (the connection failed), with exponential backoff: a resent lookup or
        update the shard already took is refused (FAILED_PRECONDITION / NOT_FOUND), never applied twice; a
        resent checkpoint or restore writes or reads the same files again. Any
        other failure -- DEADLINE_EXCEEDED after `timeout_s` included (a partitioned or frozen shard: the
        request may have arrived) -- is final and raised as ShardCallFailed naming the shard."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    where = f"shard {shard} at {self.addresses[shard]}"
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        raise ShardUnavailable(
                            f"{where} unavailable for {what} after {self.retries + 1} attempts "
                            f"(plan version {self.plan_version}): {e.details()}", e.code()) from None
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise ShardCallFailed(
                            f"{where} did not answer {what} within the {self.timeout_s:g}s RPC deadline "
                            f"(partitioned, frozen or overloaded; plan version {self.plan_version}): "
                            f"{e.details()}", e.code()) from None
                    raise ShardCallFailed(f"{where} failed {what} (plan version {self.plan_version}): "
                                          f"{e.code().name}: {e.details()}", e.code()) from None
                log.warning("shard %d unavailable for %s (attempt %d): retrying in %.2fs", shard, what, attempt + 1,
                            delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def lookup_async(self, requests: dict[int, ShardRequest], step: int,
                     no_grad: bool = False) -> dict[int, Pending]:
        """Sends every shard its request at once; `Pending.result()` gathers, resending if unreachable."""
        if self.member_check is not None and not no_grad:
            self.member_check()
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
        if self.member_check is not None:
            self.member_check()
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

        return self.transport.call(self.shard, self.what, call)


class CollectiveError(RuntimeError):
    """The collective transport failed: a shard reported a failure in the status round, or an exchange
    broke (a peer died, or froze past the group's timeout). Names the shard(s) and the step; the group
    cannot be used again (the job stops, and restarts from its checkpoint)."""

    def __init__(self, message: str, shards: list[int], step: int) -> None:
        super().__init__(message)
        self.shards, self.step = shards, step


class CollectiveTransport:
    """Ids, embeddings and gradients through `all_to_all_single` in the job's torch.distributed group
    (protocol: embedding_service/collective.py). Trainers are ranks 0..T-1, shard s is rank T+s.
    The ids of the next batch are exchanged before the gradients of the current one; every round ends
    with a status round before the embeddings come back, so a shard's failure is an error here, not a hang.
    `addresses` (the shards' gRPC servers) name the shards that stopped answering when an exchange breaks."""

    def __init__(self, num_trainers: int, num_shards: int, addresses: list[str] | None = None,
                 tls_ca: str | None = None) -> None:
        self.trainers, self.shards = num_trainers, num_shards
        self.world = num_trainers + num_shards
        self.addresses, self.tls_ca = list(addresses or []), tls_ca
        self._step = -1  # the step of the last ids sent (the round in progress)
        self._status_due = False  # the round in progress has not had its status round yet
        self.broken: CollectiveError | None = None

    def _to_shards(self, per_shard: dict[int, int]) -> list[int]:
        return [0] * self.trainers + [per_shard.get(s, 0) for s in range(self.shards)]

    def _exchange(self, what: str, send: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                  dtype: torch.dtype) -> torch.Tensor:
        return self._collective(what, lambda: exchange(send, send_splits, recv_splits, dtype))

    def _collective(self, what: str, call: Callable[[], T]) -> T:
        if self.broken is not None:
            raise self.broken
        try:
            return call()
        except RuntimeError as e:  # gloo / NCCL: a peer's connection closed, or the group's timeout expired
            dead = self._unreachable_shards()
            who = (", ".join(f"shard {s} at {self.addresses[s]} does not answer" for s in dead) if dead
                   else f"no shard's gRPC server is down ({self.shards} shards, ranks {self.trainers}.."
                        f"{self.world - 1}); a trainer may have died")
            self.broken = CollectiveError(f"collective transport: the {what} of step {self._step} failed: {who}: "
                                          f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}",
                                          dead, self._step)
            raise self.broken from None

    def _unreachable_shards(self) -> list[int]:
        """Asks every shard's gRPC server (health, 2 s): a killed shard's is gone too."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from protos.channels import open_channel

        dead = []
        for s, address in enumerate(self.addresses):
            channel = open_channel(address, tls_ca=self.tls_ca)
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                dead.append(s)
            finally:
                channel.close()
        return dead

    def _status(self) -> None:
        """Round part 5, once per round: raises CollectiveError naming every shard that failed."""
        if not self._status_due:
            return
        self._status_due = False
        failures = self._collective("status round", lambda: status_round(self.shards))
        if failures:
            self.broken = CollectiveError("collective transport: " + "; ".join(map(str, failures)),
                                          [f.shard for f in failures], min(f.step for f in failures))
            raise self.broken

    def _header(self, code: int, requests: dict[int, ShardRequest] | None = None) -> None:
        self._status()  # the previous round's, if no embeddings closed it (a PAUSE round)
        header = torch.zeros(self.world, 3, dtype=torch.int64)
        header[self.trainers :, 2] = code
        for s, req in (requests or {}).items():
            header[self.trainers + s, :2] = torch.tensor([req.lengths.numel(), req.values.numel()])
        self._exchange("header", header.flatten(), [3] * self.world, [3] * self.world, torch.int64)
        self._status_due = code != STOP

    def send_ids(self, requests: dict[int, ShardRequest] | None, step: int) -> dict[int, ShardRequest] | None:
        """Round part 1-3: the next batch's ids, or PAUSE when there is none."""
        if requests is None:
            self._header(PAUSE)
            return None
        self._header(step, requests)
        self._step = step
        order = sorted(requests)
        for field in ("lengths", "values"):
            parts = [getattr(requests[s], field).to(torch.int64) for s in order]
            self._exchange(f"{field} exchange", torch.cat(parts),
                           self._to_shards({s: p.numel() for s, p in zip(order, parts, strict=True)}),
                           [0] * self.world, torch.int64)
        return requests

    def send_grads(self, grads: dict[int, torch.Tensor]) -> None:
        """Round part 4: the current batch's gradients."""
        order = sorted(grads)
        self._exchange("gradient exchange", torch.cat([grads[s].reshape(-1).float() for s in order]),
                       self._to_shards({s: grads[s].numel() for s in order}), [0] * self.world, torch.float32)

    def recv_embeddings(self, requests: dict[int, ShardRequest]) -> dict[int, LookupResult]:
        """Round parts 5-6: the status round, then the pooled embeddings of the batch whose ids were sent."""
        self._status()
        order = sorted(requests)
        batch = {s: requests[s].lengths.numel() // len(requests[s].features) for s in order}
        sizes = {s: batch[s] * sum(requests[s].dims) for s in order}
        emb = self._exchange("embedding exchange", torch.empty(0), [0] * self.world, self._to_shards(sizes),
                             torch.float32)
        parts = torch.split(emb, [sizes[s] for s in order])
        return {s: LookupResult("", p.view(batch[s], -1), list(requests[s].dims))
                for s, p in zip(order, parts, strict=True)}

    def stop(self) -> None:
        """Ends the shards' collective loops (after a PAUSE: no batch is current). Nothing to end when the
        group broke: the shards already left."""
        if self.broken is None:
            self._header(STOP)
