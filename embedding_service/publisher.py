"""Publishes the rows training changed, as coalesced deltas on Redis Streams (protos.deltas).

The training path only records which ids a step touched (slices of tensors it already holds, appended
under the step lock it already holds); a background thread, every `interval_s`, reads the current value
of those rows at one applied-step boundary and appends one entry per table. So publishing never blocks a
step on Redis: when Redis is slow or down the recorded ids accumulate up to `max_pending_rows`, then are
dropped (counted), and the publisher's sequence skips one so that every reader notices the gap.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos.deltas import DeltaDType, RowDelta, encode, stream_key

log = logging.getLogger(__name__)


@dataclass
class PublishSettings:
    """`publish_deltas` in the shard config."""

    redis_url: str
    namespace: str = "recsys"
    interval_s: float = 0.1  # coalescing interval: one entry per table at most this often
    dtype: str = "fp32"  # rows on the wire: fp32, or fp16 (half the bytes)
    retention: int = 10000  # entries kept per stream (XADD MAXLEN ~)
    max_pending_rows: int = 1 << 20  # recorded ids awaiting a flush; past it they are dropped (a gap)

    def __post_init__(self) -> None:
        DeltaDType(self.dtype)
        if self.interval_s <= 0:
            raise ValueError(f"publish_deltas.interval_s: must be > 0, got {self.interval_s}")
        for name in ("retention", "max_pending_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"publish_deltas.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SliceRows:
    """Where a slice's rows live in the table: its state index, table, and row/column offsets."""

    index: int
    table: str
    row_offset: int
    col_offset: int


class PublisherMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.entries = Counter("delta_entries", "delta entries appended to Redis", registry=registry)
        self.rows = Counter("delta_rows", "rows published in delta entries", registry=registry)
        self.bytes = Counter("delta_bytes", "bytes of ids and rows published", registry=registry)
        self.dropped = Counter("delta_dropped_rows", "recorded row ids dropped (buffer full or Redis down)",
                               registry=registry)
        self.errors = Counter("delta_publish_errors", "flushes that failed to reach Redis", registry=registry)
        self.pending = Gauge("delta_pending_rows", "recorded row ids awaiting a flush", registry=registry)
        self.flush = Histogram("delta_flush_seconds", "time to read and append one flush", registry=registry)


class DeltaPublisher:
    """`record()` on the training path (under the step lock), `flush()` from its own thread."""

    def __init__(self, settings: PublishSettings, shard_id: int, read_rows: Callable, registry: CollectorRegistry,
                 client: redis.Redis | None = None) -> None:
        """`read_rows(plan_version, slice_index, local_ids) -> (step, rows) | None` reads rows at a step
        boundary of that plan version (None: the plan changed since the ids were recorded)."""
        self.settings = settings
        self.shard_id = shard_id
        self.read_rows = read_rows
        self.publisher = uuid.uuid4().hex[:12]
        self.dtype = DeltaDType(settings.dtype)
        self.metrics = PublisherMetrics(registry)
        self.redis = client or redis.Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._lock = threading.Lock()
        self._pending: dict[int, list[torch.Tensor]] = {}  # slice index -> touched local ids, not yet flushed
        self._pending_rows = 0
        self._slices: dict[int, SliceRows] = {}
        self._plan_version = 0
        self._first_at = 0.0  # unix time of the oldest recorded, unpublished change
        self._since: dict[str, int] = {}  # table -> step of its previous entry (or the step publishing began)
        self._seq: dict[str, int] = {}
        self._gap = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delta-publisher", daemon=True)

    def start(self) -> DeltaPublisher:
        self._thread.start()
        return self

    def close(self, flush: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if flush:
            self.flush()

    def set_slices(self, plan_version: int, slices: list[SliceRows], applied_step: int) -> None:
        """The slices of the plan now served (at start, Restore and Commit; flush() first so the old plan's
        rows go out), from `applied_step` on."""
        with self._lock:
            self._since = {s.table: applied_step for s in slices}
            self._plan_version = plan_version
            self._slices = {s.index: s for s in slices}
            self._pending.clear()
            self._pending_rows = 0

    def rewind(self, applied_step: int) -> None:
        """After a Restore: what was recorded is void, and readers must resynchronise (a gap)."""
        with self._lock:
            self._since = dict.fromkeys(self._since, applied_step)
            self._pending.clear()
            self._pending_rows = 0
            self._gap = True

    # -- training path --------------------------------------------------------------------------
    def record(self, touched: list[tuple[int, torch.Tensor]]) -> None:
        """The (slice index, local ids) a step changed. Cheap: references to the batch's id tensors."""
        n = sum(int(ids.numel()) for _, ids in touched)
        with self._lock:
            if self._pending_rows + n > self.settings.max_pending_rows:
                self._drop(n)
                return
            if not self._pending:  # the oldest change of the next entries: their lag counts from here
                self._first_at = time.time()
            for index, ids in touched:
                self._pending.setdefault(index, []).append(ids)
            self._pending_rows += n
        self.metrics.pending.set(self._pending_rows)

    def _drop(self, n: int) -> None:
        """Everything recorded goes (a reader must resynchronise anyway once one row is lost)."""
        self.metrics.dropped.inc(n + self._pending_rows)
        self._pending.clear()
        self._pending_rows = 0
        self._gap = True

    # -- background -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.flush()
            except Exception as e:  # the publisher never takes the shard down
                log.exception("delta flush failed: %s", e)

    def flush(self) -> int:
        """Reads every recorded row once and appends one entry per table; returns the entries appended."""
        start = time.perf_counter()
        with self._lock:
            pending, self._pending, self._pending_rows = self._pending, {}, 0
            first_at = self._first_at
            gap, self._gap = self._gap, False
            slices, plan_version = dict(self._slices), self._plan_version
        self.metrics.pending.set(0)
        if not pending and not gap:
            return 0
        deltas: list[RowDelta] = []
        for index, chunks in sorted(pending.items()):
            sl = slices.get(index)
            if sl is None:
                continue
            ids = torch.unique(torch.cat([c.reshape(-1).to(torch.int64) for c in chunks]))
            read = self.read_rows(plan_version, index, ids)
            if read is None:  # a Commit switched plans meanwhile: set_slices dropped what was recorded
                break
            step, rows = read
            deltas.append(RowDelta(table=sl.table, shard=self.shard_id, publisher=self.publisher, seq=0,
                                   plan_version=plan_version, since=0, step=step, applied_at=first_at,
                                   col_offset=sl.col_offset, ids=(ids + sl.row_offset).numpy(),
                                   rows=rows.numpy().astype(self.dtype.numpy, copy=False)))
        try:
            self._append(deltas, gap)
        except redis.RedisError as e:
            self.metrics.errors.inc()
            log.warning("delta publish to %s failed (%s); %d rows dropped, readers will resynchronise",
                        self.settings.redis_url, e, sum(len(d.ids) for d in deltas))
            with self._lock:
                self._drop(sum(len(d.ids) for d in deltas))
            return 0
        self.metrics.flush.observe(time.perf_counter() - start)
        return len(deltas)

    def _append(self, deltas: list[RowDelta], gap: bool) -> None:
        """One entry per (table, column block): a table's row-wise slices on this shard go out together,
        at the earliest step their rows were read at (an entry holds every change up to its step)."""
        groups: dict[tuple[str, int], list[RowDelta]] = {}
        for d in deltas:
            groups.setdefault((d.table, d.col_offset), []).append(d)
        seqs, since = dict(self._seq), dict(self._since)
        pipe = self.redis.pipeline(transaction=False)
        sizes = rows = 0
        for (table, _), parts in groups.items():
            seqs[table] = seqs.get(table, 0) + (2 if gap and seqs.get(table) == self._seq.get(table) else 1)
            entry = encode(RowDelta(**{**parts[0].__dict__, "seq": seqs[table], "since": self._since.get(table, -1),
                                       "step": min(d.step for d in parts),
                                       "ids": np.concatenate([d.ids for d in parts]),
                                       "rows": np.concatenate([d.rows for d in parts])}))
            since[table] = min(d.step for d in parts)
            sizes += len(entry[b"ids"]) + len(entry[b"rows"])
            rows += sum(len(d.ids) for d in parts)
            pipe.xadd(stream_key(self.settings.namespace, table), entry, maxlen=self.settings.retention,
                      approximate=True)
        if gap:  # tables with nothing new still learn of the gap: their next entry skips a number
            for table in {s.table for s in self._slices.values()} - {t for t, _ in groups}:
                seqs[table] = seqs.get(table, 0) + 1
        pipe.execute()
        self._seq, self._since = seqs, since
        self.metrics.entries.inc(len(groups))
        self.metrics.rows.inc(rows)
        self.metrics.bytes.inc(sizes)
