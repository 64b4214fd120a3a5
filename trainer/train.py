"""The training step against the shard services, and the loop over steps (pipelined by default).

Each trainer takes its part of the global batch, routes ids to the shards, runs the dense model on
the reassembled pooled embeddings, and pushes the embedding gradients back. Dense gradients are
averaged by DDP; embedding gradients are scaled by 1/world so that the shard's merged update (the sum
over trainers) is the gradient of the global mean loss, exactly as one process on the global batch.
The pipelined loop sends batch i+1's ids before batch i's dense work and gives the same results as
waiting for each step's updates; what happens between steps (checkpoints, SIGTERM, rollouts) is the
job's (`trainer.job`).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from protos import common_pb2
from protos.collective import timeout as collective_timeout
from protos.model_config import ModelConfig
from trainer.batch import Batch, SparseBatch
from trainer.local import LocalTables, MultiOptimizer, Replicated
from trainer.model import DenseDLRM
from trainer.router import Router
from trainer.transport import CollectiveTransport, GrpcTransport, Pending

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: int
    loss: float
    logits: torch.Tensor


class ShardedTrainer:
    def __init__(self, model_config: ModelConfig, plan: common_pb2.ShardingPlan, addresses: list[str], *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, wire_dtype: torch.dtype = torch.float32,
                 transport: str = "grpc", trainer_group: dist.ProcessGroup | None = None,
                 tls_ca: str | None = None, token: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, trainer_epoch: int = 0,
                 member_check: Callable[[], None] | None = None, rpc_timeout_s: float = 120.0) -> None:
        """`trainer_epoch`: this trainer's membership epoch (coordinated jobs), sent with every write;
        `member_check` raises once the coordinator replaced this trainer (checked before every write);
        `rpc_timeout_s`: the deadline of every shard RPC (a partitioned shard fails the step, never hangs)."""
        if len(addresses) != plan.num_shards:
            raise ValueError(f"--shards: the plan (version {plan.version}) has {plan.num_shards} shards, "
                             f"got {len(addresses)} addresses")
        self.config = model_config
        self.rank, self.world_size = rank, world_size
        self.wire_dtype = wire_dtype
        self.tls_ca = tls_ca
        self.credentials = {"token": token, "tls_cert": tls_cert, "tls_key": tls_key}  # for the shards' control plane
        self.trainer_epoch = trainer_epoch
        self.member_check = member_check
        self.rpc_timeout_s = rpc_timeout_s
        self._connect(plan, addresses, transport)
        self.model = DenseDLRM(model_config, seed=seed)
        self.local = LocalTables(model_config, list(plan.data_parallel), seed=seed) if plan.data_parallel else None
        self.replicated = Replicated(self.model, self.local)
        self.dense = (DistributedDataParallel(self.replicated, process_group=trainer_group) if world_size > 1
                      else self.replicated)
        self.optimizer = MultiOptimizer([torch.optim.SGD(self.model.parameters(), lr=model_config.dense_lr),
                                         *(self.local.optimizers() if self.local else [])])
        self._inflight: collections.deque[dict[int, Pending]] = collections.deque()  # updates not yet waited for
        # the pipelined lookup of the next step: in flight, or gathered at a fence (kept if the plan stays)
        self._ahead: dict[int, Pending] | None = None
        self._ahead_result: tuple[torch.Tensor, dict[int, str]] | None = None

    def _connect(self, plan: common_pb2.ShardingPlan, addresses: list[str], transport: str) -> None:
        self.router = Router(plan, self.config)
        # gRPC always carries the control plane (checkpoints, evaluation); the data plane is gRPC or collective
        self.transport = GrpcTransport(addresses, plan_version=plan.version, trainer_id=self.rank,
                                       wire_dtype=self.wire_dtype, tls_ca=self.tls_ca, **self.credentials,
                                       trainer_epoch=self.trainer_epoch, member_check=self.member_check,
                                       timeout_s=self.rpc_timeout_s)
        if transport == "collective":
            self.data: GrpcTransport | CollectiveTransport = CollectiveTransport(
                self.world_size, plan.num_shards, addresses, tls_ca=self.tls_ca)
        elif transport == "grpc":
            self.data = self.transport
        else:
            raise ValueError(f"transport: expected 'grpc' or 'collective', got {transport!r}")

    def fence(self) -> None:
        """Stops at a step boundary for a rollout: every update applied, the next lookup gathered."""
        self.wait_updates()
        if self._ahead is not None:
            self._ahead_result = self.gather(self._ahead)
            self._ahead = None

    def switch_plan(self, plan: common_pb2.ShardingPlan, addresses: list[str]) -> None:
        """After a rollout: route by the new plan; the lookup gathered at the fence is sent again."""
        if isinstance(self.data, CollectiveTransport):
            raise ValueError("live re-sharding needs the gRPC transport")
        if len(addresses) != plan.num_shards:
            raise ValueError(f"plan version {plan.version} has {plan.num_shards} shards, "
                             f"got {len(addresses)} addresses")
        if sorted(plan.data_parallel) != sorted(self.router.plan.data_parallel):
            raise ValueError("a rollout cannot change which tables are data_parallel")
        self.transport.close()
        self._connect(plan, addresses, "grpc")
        self._ahead_result = None
        log.info("trainer %d now on plan version %d (%d shards)", self.rank, plan.version, plan.num_shards)

    def close(self) -> None:
        if isinstance(self.data, CollectiveTransport):
            self.data.stop()
        self.transport.close()

    def send_lookup(self, sparse: SparseBatch, step: int, no_grad: bool = False) -> dict[int, Pending]:
        """input_dist and the fan-out; the results are gathered by `gather`."""
        requests = self.router.input_dist(sparse.keys, sparse.lengths, sparse.values, sparse.weights)
        plane = self.transport if no_grad else self.data
        return plane.lookup_async(requests, step, no_grad=no_grad)

    def gather(self, pending: dict[int, Pending]) -> tuple[torch.Tensor, dict[int, str]]:
        """output_dist: the pooled [B, F * D] and the shards' handles."""
        results = {s: p.result() for s, p in pending.items()}
        emb = self.router.output_dist({s: r.embeddings for s, r in results.items()})
        return emb, {s: r.handle for s, r in results.items()}

    def lookup(self, sparse: SparseBatch, step: int, no_grad: bool = False) -> tuple[torch.Tensor, dict[int, str]]:
        return self.gather(self.send_lookup(sparse, step, no_grad))

    def _dense_backward(self, batch: Batch, step: int, emb: torch.Tensor) -> tuple[StepResult, dict[int, torch.Tensor]]:
        """Dense forward/backward and optimizer step; returns the embedding gradients per shard."""
        emb.requires_grad_()
        logits = self.dense(batch.dense, emb, batch.sparse)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = self.router.grad_dist(emb.grad / self.world_size)
        self.optimizer.step()
        return StepResult(step, float(loss.detach()), logits.detach()), grads

    def _dense_step(self, batch: Batch, step: int, emb: torch.Tensor,
                    handles: dict[int, str]) -> tuple[StepResult, dict[int, Pending]]:
        result, grads = self._dense_backward(batch, step, emb)
        return result, self.data.update_async(handles, grads, step)

    def _train_collective(self, batches: Iterable[Batch], first_step: int, pipelined: bool) -> Iterator[StepResult]:
        """The loop over the collective transport: per round, the next batch's ids (before the dense
        work when pipelined), this batch's gradients, the next batch's embeddings."""
        data = self.data
        assert isinstance(data, CollectiveTransport)

        def route(b: Batch) -> dict:
            sp = b.sparse
            return self.router.input_dist(sp.keys, sp.lengths, sp.values, sp.weights)

        it = iter(batches)
        batch = next(it, None)
        if batch is None:
            return
        step = first_step
        sent = data.send_ids(route(batch), step)
        results = data.recv_embeddings(sent)
        while batch is not None:
            emb = self.router.output_dist({s: r.embeddings for s, r in results.items()})
            nxt = next(it, None)
            if pipelined:
                sent = data.send_ids(route(nxt) if nxt is not None else None, step + 1)
            result, grads = self._dense_backward(batch, step, emb)
            if not pipelined:
                sent = data.send_ids(route(nxt) if nxt is not None else None, step + 1)
            data.send_grads(grads)
            if nxt is not None:
                results = data.recv_embeddings(sent)
            yield result
            batch, step = nxt, step + 1

    def train(self, batches: Iterable[Batch], first_step: int = 0, pipelined: bool = True,
              staleness: int = 0) -> Iterator[StepResult]:
        """Steps over `batches` (this trainer's parts). Pipelined, the lookup of batch i+1 is sent before
        the dense work of batch i; in sync mode the shard serves it only after update i is applied, so
        the results equal the non-pipelined loop's. `staleness` K > 0 (async shards only) lets up to K
        steps' updates still be in flight when a lookup is gathered: bounded-staleness training."""
        if staleness and isinstance(self.data, CollectiveTransport):
            raise ValueError("staleness: the collective transport is synchronous")
        if staleness:
            for shard, client in enumerate(self.transport.clients):
                mode = client.info().mode
                if mode != "async":
                    raise ValueError(f"staleness {staleness}: shard {shard} at {client.address} runs {mode} mode; "
                                     "bounded staleness needs shards started with mode async")
        if isinstance(self.data, CollectiveTransport):
            yield from self._train_collective(batches, first_step, pipelined)
            return
        it = iter(batches)
        batch = next(it, None)
        step = first_step
        self._ahead = self.send_lookup(batch.sparse, step) if batch is not None else None
        while batch is not None:
            # earlier steps' updates first: the shard serves this lookup only after applying them (all
            # but the last `staleness`), so this costs no overlap, and a failed update is reported
            # instead of stalling the lookup
            self.wait_updates(keep=staleness)
            if self._ahead_result is not None:  # gathered at a fence, the plan unchanged
                (emb, handles), self._ahead_result = self._ahead_result, None
            else:
                if self._ahead is None:  # dropped by a plan switch: look it up under the new plan
                    self._ahead = self.send_lookup(batch.sparse, step)
                emb, handles = self.gather(self._ahead)
            self._ahead = None
            nxt = next(it, None)
            if pipelined and nxt is not None:
                self._ahead = self.send_lookup(nxt.sparse, step + 1)
            result, updates = self._dense_step(batch, step, emb, handles)
            self._inflight.append(updates)
            if not pipelined or nxt is None:
                self.wait_updates()
                if nxt is not None:
                    self._ahead = self.send_lookup(nxt.sparse, step + 1)
            yield result
            batch, step = nxt, step + 1

    def wait_updates(self, keep: int = 0) -> None:
        """Blocks until all but the last `keep` steps' updates of this trainer are applied (in sync mode:
        every trainer's)."""
        while len(self._inflight) > keep:
            for p in self._inflight.popleft().values():
                p.result()

    @torch.no_grad()
    def predict(self, batch, step: int) -> torch.Tensor:
        emb, _ = self.lookup(batch.sparse, step, no_grad=True)
        return torch.sigmoid(self.replicated(batch.dense, emb, batch.sparse))


def evaluate(trainer: ShardedTrainer, batches: Iterable[Batch]) -> dict[str, float]:
    """Held-out AUC, normalized entropy and log loss of the current model (no updates, no step order)."""
    from trainer.data import auc, normalized_entropy

    probs, labels = [], []
    for b in batches:
        probs.append(trainer.predict(b, 0))
        labels.append(b.labels)
    p, y = torch.cat(probs), torch.cat(labels)
    return {"auc": auc(p, y), "ne": normalized_entropy(p, y),
            "logloss": float(F.binary_cross_entropy(p.double().clamp(1e-7, 1 - 1e-7), y.double()))}


def init_distributed(rank: int, world_size: int, num_shards: int = 0,
                     timeout_s: float | None = None) -> dist.ProcessGroup | None:
    """torchrun-compatible env:// rendezvous (gloo on CPU, NCCL with CUDA). For the collective transport
    (`num_shards` > 0) the shards join the same group as ranks world_size.. and the trainers get a
    subgroup of their own for DDP; every rank creates it, in the same order. There `timeout_s` bounds every
    collective (a frozen shard makes it raise instead of hanging; default 300 s)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if num_shards:
        dist.init_process_group(backend, rank=rank, world_size=world_size + num_shards,
                                timeout=collective_timeout(timeout_s))
        group = dist.new_group(list(range(world_size)))
        log.info("rank %d of %d trainers joined the collective group with %d shards", rank, world_size, num_shards)
        return group
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
        log.info("rank %d of %d joined", dist.get_rank(), dist.get_world_size())
    return None
