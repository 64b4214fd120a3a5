"""Step ordering across trainers: sync (one merged update per step) or async (bounded staleness).

Sync: the lookups of step s from all N trainers are gathered and run as ONE TBE forward over the
concatenated batch; their updates are gathered and applied as ONE backward, which is exactly what a
single TBE does on the global batch. A lookup of step s+1 waits until step s is applied.

Async: each lookup runs alone, each update is applied when it arrives; a trainer's lookup of step s
waits until its own update of step s-1-staleness was applied.
"""

from __future__ import annotations

import collections
import enum
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from embedding_service.config import SyncMode
from embedding_service.errors import ShardError, not_found, precondition
from embedding_service.tables import ForwardResult, PreparedBatch, ShardTables


class StepState(enum.Enum):
    COLLECTING = "collecting"
    FORWARDED = "forwarded"
    APPLIED = "applied"
    EXPIRED = "expired"


@dataclass
class StepGroup:
    step: int
    deadline: float
    batches: dict[int, PreparedBatch] = field(default_factory=dict)  # trainer -> batch
    order: list[int] = field(default_factory=list)  # trainers in forward order
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    forward: ForwardResult | None = None
    state: StepState = StepState.COLLECTING
    handles: list[str] = field(default_factory=list)


@dataclass
class Handle:
    id: str
    trainer: int
    step: int
    group: StepGroup

    @property
    def batch(self) -> PreparedBatch:
        return self.group.batches[self.trainer]


@dataclass
class Counters:
    lookups: int = 0
    updates: int = 0
    rows_looked_up: int = 0
    rows_updated: int = 0


class StepScheduler:
    def __init__(self, tables: ShardTables, mode: SyncMode, num_trainers: int, staleness: int,
                 handle_ttl_s: float, wait_timeout_s: float, max_pending_handles: int = 1024) -> None:
        self.tables = tables
        self.mode = mode
        self.num_trainers = num_trainers
        self.staleness = staleness
        self.ttl = handle_ttl_s
        self.wait_timeout = wait_timeout_s
        self.max_pending_handles = max_pending_handles
        self.cond = threading.Condition()
        self.handles: dict[str, Handle] = {}
        self.expired: collections.deque[str] = collections.deque(maxlen=4096)
        self.current: StepGroup | None = None  # sync mode's open step
        self.applied_step = -1
        self.counters = Counters()
        self._ids = itertools.count()
        self.closed = False
        # Called under the lock after each applied step with its group (the delta publisher records the ids)
        self.on_applied: Callable[[StepGroup], None] | None = None
        # Bumped by every reset (a Restore): a request that waited across one belongs to the state before it
        # and must neither install nor join a step of the restored state.
        self.generation = 0

    # -- public -------------------------------------------------------------------------------
    def lookup(self, batch: PreparedBatch, trainer: int, step: int, no_grad: bool) -> tuple[str, torch.Tensor]:
        if not 0 <= trainer < self.num_trainers:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"trainer_id: {trainer} out of range [0, {self.num_trainers})")
        with self.cond:
            self._expire()
            if no_grad:
                fwd = self.tables.forward([batch], requires_grad=False)
                self._count_lookup(batch)
                return "", fwd.embeddings[0]
            self._check_bound(trainer, step)
            if self.mode is SyncMode.SYNC:
                return self._sync_lookup(batch, trainer, step, self.generation)
            return self._async_lookup(batch, trainer, step, self.generation)

    def handle(self, handle_id: str) -> Handle:
        with self.cond:
            self._expire()
            return self._get(handle_id)

    def update(self, handle_id: str, grad: torch.Tensor) -> tuple[int, int]:
        """Applies (async) or merges (sync) the gradient; returns (applied step, trainers merged)."""
        with self.cond:
            self._expire()
            h = self._get(handle_id)
            group = h.group
            if h.trainer in group.grads:
                raise precondition(f"handle {handle_id}: update already received")
            group.grads[h.trainer] = grad
            self.counters.updates += 1
            self.counters.rows_updated += h.batch.num_ids
            if len(group.grads) == len(group.order):
                self._apply(group)
                return group.step, len(group.order)
            self._wait(lambda: group.state is not StepState.FORWARDED,
                       f"step {group.step}: waiting for updates from trainers "
                       f"{sorted(set(group.order) - set(group.grads))}", self.generation)
            if group.state is StepState.EXPIRED:
                raise ShardError(grpc.StatusCode.ABORTED,
                                 f"step {group.step} expired before every trainer sent its update")
            return group.step, len(group.order)

    def reset(self, applied_step: int) -> None:
        """After a restore: drop every pending step and fail every waiting request (ABORTED); the next sync
        step must follow applied_step. A waiting lookup is one the restored state never saw -- often of a
        killed trainer, whose handler the server still runs -- so it must not install its step."""
        with self.cond:
            self.generation += 1
            for h in list(self.handles):
                self._drop(h)
            if self.current is not None:
                self.current.state = StepState.EXPIRED
            self.current = None
            self.applied_step = applied_step
            self.cond.notify_all()

    def shutdown(self) -> None:
        """Fails every waiting request with UNAVAILABLE so a draining server does not wait on them."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # -- sync ---------------------------------------------------------------------------------
    def _sync_lookup(self, batch: PreparedBatch, trainer: int, step: int,
                     generation: int) -> tuple[str, torch.Tensor]:
        if step <= self.applied_step:
            raise precondition(f"step {step}: already applied (last applied step {self.applied_step})")

        def ready() -> bool:
            cur = self.current
            return cur is None or (cur.step == step and cur.state is StepState.COLLECTING
                                   and trainer not in cur.batches)

        cur = self.current
        if cur is not None and cur.step == step and trainer in cur.batches:
            raise precondition(f"trainer {trainer} already looked up step {step}")
        self._wait(ready, f"step {step}: step {cur.step if cur else '?'} is not applied yet", generation)
        if self.current is None:
            if step <= self.applied_step:
                raise precondition(f"step {step}: already applied (last applied step {self.applied_step})")
            self.current = StepGroup(step, time.monotonic() + self.ttl)
        group = self.current
        group.batches[trainer] = batch
        self._count_lookup(batch)
        if len(group.batches) == self.num_trainers:
            group.order = sorted(group.batches)
            group.forward = self.tables.forward([group.batches[t] for t in group.order], requires_grad=True)
            group.state = StepState.FORWARDED
            group.deadline = time.monotonic() + self.ttl
            self.cond.notify_all()
        else:
            self._wait(lambda: group.state is not StepState.COLLECTING,
                       f"step {step}: waiting for lookups from trainers "
                       f"{sorted(set(range(self.num_trainers)) - set(group.batches))}", generation)
        if group.state is StepState.EXPIRED:
            raise ShardError(grpc.StatusCode.ABORTED, f"step {step} expired before every trainer looked up")
        return self._register(group, trainer), group.forward.embeddings[group.order.index(trainer)]

    # -- async --------------------------------------------------------------------------------
    def _async_lookup(self, batch: PreparedBatch, trainer: int, step: int,
                      generation: int) -> tuple[str, torch.Tensor]:
        limit = step - 1 - self.staleness

        def ready() -> bool:
            return not any(h.trainer == trainer and h.step <= limit for h in self.handles.values())

        self._wait(ready, f"trainer {trainer} step {step}: its update of step {limit} is not applied yet",
                   generation)
        group = StepGroup(step, time.monotonic() + self.ttl)
        group.batches[trainer] = batch
        group.order = [trainer]
        group.forward = self.tables.forward([batch], requires_grad=True)
        group.state = StepState.FORWARDED
        self._count_lookup(batch)
        return self._register(group, trainer), group.forward.embeddings[0]

    # -- helpers ------------------------------------------------------------------------------
    def _check_bound(self, trainer: int, step: int) -> None:
        """Every handle holds a forward (indices, offsets, outputs) until its update or its ttl: trainers that
        look up without updating would grow memory without limit, so past the bound a lookup is refused
        before anything is computed or stored."""
        if len(self.handles) >= self.max_pending_handles:
            raise ShardError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"max_pending_handles: {len(self.handles)} lookup handles already await their update "
                             f"(bound {self.max_pending_handles}); trainer {trainer} step {step} refused: send the "
                             f"pending updates (or let them expire after handle_ttl_s {self.ttl:g}s)")

    def _apply(self, group: StepGroup) -> None:
        self.tables.backward(group.forward, [group.grads[t] for t in group.order])
        group.state = StepState.APPLIED
        if self.on_applied is not None:
            self.on_applied(group)
        group.forward = None
        for h in group.handles:
            self.handles.pop(h, None)
        if self.mode is SyncMode.SYNC:
            self.current = None
        self.applied_step = max(self.applied_step, group.step)
        self.cond.notify_all()

    def _register(self, group: StepGroup, trainer: int) -> str:
        hid = f"t{trainer}-s{group.step}-{next(self._ids)}"
        self.handles[hid] = Handle(hid, trainer, group.step, group)
        group.handles.append(hid)
        return hid

    def _get(self, handle_id: str) -> Handle:
        h = self.handles.get(handle_id)
        if h is None:
            if handle_id in self.expired:
                raise not_found(f"handle {handle_id!r} expired (ttl {self.ttl:g}s); look up again")
            raise not_found(f"handle {handle_id!r} is unknown")
        return h

    def _count_lookup(self, batch: PreparedBatch) -> None:
        self.counters.lookups += 1
        self.counters.rows_looked_up += batch.num_ids

    def _drop(self, hid: str) -> None:
        self.handles.pop(hid, None)
        self.expired.append(hid)

    def _expire(self) -> None:
        now = time.monotonic()
        groups = {id(h.group): h.group for h in self.handles.values()}
        if self.current is not None:
            groups[id(self.current)] = self.current
        for g in groups.values():
            if g.deadline < now and g.state in (StepState.COLLECTING, StepState.FORWARDED):
                g.state = StepState.EXPIRED
                g.forward = None
                for hid in g.handles:
                    self._drop(hid)
                if self.current is g:
                    self.current = None
                self.cond.notify_all()

    def _wait(self, predicate, what: str, generation: int) -> None:
        """Waits (lock held) until `predicate`; fails if the shard restores, shuts down, or the wait times out."""
        end = time.monotonic() + self.wait_timeout
        while True:
            if self.generation != generation:
                raise ShardError(grpc.StatusCode.ABORTED,
                                 f"{what}: the shard was restored (to step {self.applied_step}) while this request "
                                 f"waited; a request from before the restore cannot take part in a step")
            if predicate():
                return
            if self.closed:
                raise ShardError(grpc.StatusCode.UNAVAILABLE, f"shard is shutting down: {what}")
            left = end - time.monotonic()
            if left <= 0:
                raise ShardError(grpc.StatusCode.DEADLINE_EXCEEDED, f"timed out after {self.wait_timeout:g}s: {what}")
            self.cond.wait(timeout=min(left, 0.5))
            self._expire()
