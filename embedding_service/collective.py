"""The shard's side of the collective transport: trainers and shards in one torch.distributed group.

Ranks 0..T-1 are trainers, T..T+S-1 shards (gloo on CPU, NCCL on GPU; env:// rendezvous). All ranks
run the same sequence of `all_to_all_single` calls (like TorchRec's KJTAllToAll and
PooledEmbeddingsAllToAll), the shards' rows empty where they only receive. One round:

  1. header  int64 [3] per pair: number of lengths, number of ids, and the step of the NEXT batch, or
     PAUSE (no next batch: the trainers' loop ends) or STOP (the job ends)
  2. lengths int64, 3. ids int64 of the next batch   trainers -> shards (feature-major, `canonical_features`)
  4. gradients of the current batch's embeddings     trainers -> shards (when a batch is current)
  5. status: an all-reduce over every rank of each shard's (failed, step, message)  (`status_round`)
  6. pooled embeddings float32 [B_t, sum(d)] of the next batch   shards -> trainers (when no shard failed)

A shard that fails (ids out of range, a table it does not hold, a kernel error) does not leave: it takes
part in the rest of the round without computing, reports the failure in the status round, and then every
rank knows: the trainers raise an error naming the shard and the step, and every shard leaves the loop
(its gRPC server keeps serving). A shard that dies or freezes is caught by the group's timeout
(`collective_timeout_s`) or, for a killed one, by the broken connections at once.

So the ids of batch i+1 travel (and are validated) before the gradients of batch i: a trainer can send
them before its dense forward/backward of batch i (the pipeline) without changing any result, since
the forward of i+1 still runs after the backward of i.

The shard merges the T trainers' batches into ONE forward and ONE backward, exactly as sync mode does
over gRPC, so both transports give the same model.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.distributed as dist

from embedding_service.steps import StepScheduler
from embedding_service.tables import ShardTables
from protos.collective import PAUSE, STOP, ShardFailure, exchange, status_round, timeout

log = logging.getLogger(__name__)


def canonical_features(tables: ShardTables) -> list[tuple[str, int]]:
    """The (feature, slice) order of this shard's part of every exchange: tables in assignment order,
    each table's features in order, its slices by (column, row). The trainer's router uses the same."""
    refs = []
    for name, table in tables.tables.items():
        idxs = sorted((i for i, s in enumerate(tables.slices) if s.slice.table == name),
                      key=lambda i: (tables.slices[i].slice.col_offset, tables.slices[i].slice.row_offset))
        refs += [(f, i) for f in table.features for i in idxs]
    return refs


def init_group(rank: int, world_size: int, num_trainers: int,
               timeout_s: float | None = None) -> dist.ProcessGroup | None:
    """Joins the job's group; returns the trainers' subgroup (every rank must create it). `timeout_s`
    bounds every collective: a peer that froze makes it raise instead of hanging."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world_size,
                                timeout=timeout(timeout_s))
    return dist.new_group(list(range(num_trainers)))


class CollectiveLoop:
    """Serves the collective protocol on a thread beside the gRPC server (which keeps health, Info,
    Checkpoint and the rest)."""

    def __init__(self, tables: ShardTables, steps: StepScheduler, rank: int, world_size: int,
                 num_trainers: int, timeout_s: float | None = None) -> None:
        self.tables, self.sched, self.lock = tables, steps, steps.cond
        self.rank, self.world, self.num_trainers = rank, world_size, num_trainers
        self.shard = rank - num_trainers
        self.timeout_s = timeout_s
        self.refs = canonical_features(tables)
        self.dims = [tables.resolve(f, s).dim for f, s in self.refs]
        self.steps = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="collective", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            init_group(self.rank, self.world, self.num_trainers, self.timeout_s)
            log.info("collective: rank %d of %d joined (%d trainers)", self.rank, self.world, self.num_trainers)
            self._loop()
        except BaseException as e:  # a broken group cannot be recovered: report and stop serving it
            self.error = e
            log.exception("collective loop failed")

    def _failure(self, step: int, what: str, err: Exception) -> ShardFailure:
        message = getattr(err, "message", None) or str(err) or type(err).__name__
        log.error("collective: shard %d, step %d: %s: %s", self.shard, step, what, message)
        return ShardFailure(self.shard, step, f"{what}: {message}")

    def _loop(self) -> None:
        w, t = self.world, self.num_trainers
        zeros = [0] * w
        width = sum(self.dims)
        current = None  # (step, forward result, batches) awaiting its gradients
        while True:
            header = exchange(torch.zeros(3 * w, dtype=torch.int64), [3] * w, [3] * w, torch.int64).view(w, 3)
            code = int(header[:t, 2].min())
            if code == STOP:
                log.info("collective: trainers stopped after %d steps", self.steps)
                return
            failure: ShardFailure | None = None
            nxt = None
            if code != PAUSE:
                n_len, n_ids = header[:, 0].tolist(), header[:, 1].tolist()
                lengths = exchange(torch.empty(0, dtype=torch.int64), zeros, n_len, torch.int64)
                values = exchange(torch.empty(0, dtype=torch.int64), zeros, n_ids, torch.int64)
                try:
                    batches, lo, vo = [], 0, 0
                    for r in range(t):  # validated while the trainers still run the previous step's dense part
                        batches.append(self.tables.prepare(self.refs, n_len[r] // len(self.refs),
                                                           lengths[lo : lo + n_len[r]], values[vo : vo + n_ids[r]],
                                                           None))
                        lo, vo = lo + n_len[r], vo + n_ids[r]
                    nxt = (code, batches)
                except Exception as e:  # reported in this round's status; the round goes on without it
                    failure = self._failure(code, f"ids from trainer {r}", e)
            if current is not None:
                step, fwd, batches = current
                sizes = [b.batch_size * width for b in batches] + [0] * (w - t)
                grads = torch.split(exchange(torch.empty(0), zeros, sizes, torch.float32), sizes[:t])
                try:  # step i's update is applied even when batch i+1's ids failed: every shard stays at step i
                    g = [self.tables.check_grad(p.view(b.batch_size, width), b)
                         for p, b in zip(grads, batches, strict=True)]
                    with self.lock:
                        self.tables.backward(fwd, g)
                        self.sched.applied_step = step
                    self.steps += 1
                except Exception as e:
                    failure = self._failure(step, "update", e)
                current = None
            if nxt is not None and failure is None:
                try:
                    with self.lock:
                        fwd = self.tables.forward(nxt[1], requires_grad=True)
                except Exception as e:
                    failure = self._failure(nxt[0], "lookup", e)
            failures = status_round(w - t, failure)
            if failures:
                self.error = RuntimeError("; ".join(map(str, failures)))
                log.error("collective: leaving the group: %s", self.error)
                return
            if nxt is not None:
                sizes = [b.batch_size * width for b in nxt[1]] + [0] * (w - t)
                exchange(torch.cat([e.detach().reshape(-1) for e in fwd.embeddings]), sizes, zeros, torch.float32)
                current = (nxt[0], fwd, nxt[1])
