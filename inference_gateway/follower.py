"""Follows the shards' row deltas (protos.deltas) into a served model: online freshness.

Each process that holds tables runs its own follower with its own cursors (`XREAD BLOCK` from its last
entry id per stream; never a consumer group shared by replicas). Entries apply in stream order, each
under the model's write lock, so every batch sees each table at one step or a later one.

Consistency, per table: an entry holds every row its publisher changed in steps (since, step].
- A publisher seen before must continue its sequence (seq + 1); a skipped number is a gap (it dropped
  rows, or Redis lost entries).
- An entry whose step is no later than the snapshot's is skipped: the snapshot, a consistent cut, holds
  it (idempotent by step).
- A publisher seen for the first time is applied if its `since` is no later than what this follower
  already holds for the table (the snapshot's step or a later entry's); otherwise rows are missing: a gap.
A stream trimmed past a follower's position shows as one of these (the publisher's next entry skips
numbers, or a new publisher's `since` is later than what is held).
On a gap the follower asks `resync` for the latest consistent snapshot (a package exported from the
latest checkpoint) and starts over from its step, reading each stream from its oldest entry.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inference_gateway.model import ServingModel
from protos.deltas import DeltaError, RowDelta, decode, decode_dense, dense_key, stream_key

log = logging.getLogger(__name__)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


@dataclass
class FollowSettings:
    redis_url: str
    namespace: str = "recsys"
    block_ms: int = 200  # XREAD BLOCK: how long one read waits for new entries
    count: int = 256  # entries per read
    retry_s: float = 1.0  # Redis unreachable: wait this long between attempts


class FollowerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Histogram("delta_lag_seconds", "from the rows read on the shard (after their step was applied) "
                             "to the rows served", ["table"], buckets=LAG_BUCKETS, registry=registry)
        self.entries = Counter("delta_entries_applied", "delta entries applied", ["table"], registry=registry)
        self.rows = Counter("delta_rows_applied", "rows rewritten by deltas", ["table"], registry=registry)
        self.skipped = Counter("delta_entries_skipped", "entries already in the snapshot", ["table"],
                               registry=registry)
        self.gaps = Counter("delta_gaps", "gaps found (dropped rows, trimmed stream)", ["table"], registry=registry)
        self.bad = Counter("delta_bad_entries", "entries refused (checksum, shape)", ["table"], registry=registry)
        self.resyncs = Counter("delta_resyncs", "snapshot reloads after a gap", registry=registry)
        self.step = Gauge("delta_applied_step", "last step applied per table", ["table"], registry=registry)
        self.redis_errors = Counter("delta_redis_errors", "reads that failed to reach Redis", registry=registry)


@dataclass
class TableCursor:
    table: str
    last_id: bytes = b"0-0"
    have: int = -1  # every change up to this step is served
    publishers: dict[str, tuple[int, int]] = field(default_factory=dict)  # pub -> (seq, step)


class Gap(Exception):
    pass


class DeltaFollower:
    """`model()` is the served model to write into; `resync()` loads the latest snapshot and returns the new
    model (None: no snapshot; the follower then keeps applying and counts the gap); `on_applied()`, if
    given, runs on the follower's thread after each read that applied entries."""

    def __init__(self, settings: FollowSettings, model: Callable[[], ServingModel],
                 resync: Callable[[], ServingModel | None], registry: CollectorRegistry,
                 client: redis.Redis | None = None, on_applied: Callable[[], None] | None = None) -> None:
        self.settings, self._model, self._resync, self._on_applied = settings, model, resync, on_applied
        self.metrics = FollowerMetrics(registry)
        self.redis = client or redis.Redis.from_url(settings.redis_url, socket_timeout=settings.block_ms / 1000 + 5,
                                                    socket_connect_timeout=2.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delta-follower", daemon=True)
        self.cursors: dict[str, TableCursor] = {}
        self._base = -1
        self.degraded = False
        self._start_over(model())

    def start(self) -> DeltaFollower:
        self._thread.start()
        return self

    @property
    def base(self) -> int:
        """The step of the snapshot the served rows started from."""
        return self._base

    def position(self) -> dict:
        """Where this follower stands, JSON-able: what a new follower of the same rows continues from
        (image_follower keeps it beside its image, so a restarted one neither replays nor resyncs)."""
        def cursor(c: TableCursor) -> dict:
            last = c.last_id.decode() if isinstance(c.last_id, bytes) else str(c.last_id)
            return {"last_id": last, "have": c.have, "publishers": {p: list(v) for p, v in c.publishers.items()}}

        return {"base": self._base, "degraded": self.degraded, "dense": cursor(self.dense_cursor),
                "tables": {t: cursor(c) for t, c in self.cursors.items()}}

    def resume(self, position: dict) -> None:
        """Continues from an earlier follower's `position()` over the same rows; ValueError (nothing
        changed) when it names other tables or is malformed."""
        try:
            if set(position["tables"]) != set(self.cursors):
                raise ValueError(f"tables {sorted(position['tables'])}, not {sorted(self.cursors)}")
            loaded = {t: TableCursor(t, str(d["last_id"]).encode(), int(d["have"]),
                                     {p: (int(v[0]), int(v[1])) for p, v in d["publishers"].items()})
                      for t, d in (*position["tables"].items(), ("dense", position["dense"]))}
            base, degraded = int(position["base"]), bool(position["degraded"])
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"a malformed position: {e!r}") from None
        self.dense_cursor = loaded.pop("dense")
        self.cursors, self._base, self.degraded = loaded, base, degraded
        model = self._model()
        for t, c in self.cursors.items():
            model.applied_steps[t] = c.have
            self.metrics.step.labels(t).set(c.have)
        if self.dense_cursor.have > base:
            model.applied_steps["dense"] = self.dense_cursor.have

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @staticmethod
    def _base_of(model: ServingModel) -> int:
        """The step a package was exported at (-1: unknown, not from a checkpoint)."""
        return int(model.package.manifest.get("source", {}).get("step", -1))

    def _start_over(self, model: ServingModel) -> None:
        base = self._base = self._base_of(model)
        self.degraded = False
        self.cursors = {t: TableCursor(t, have=base) for t in model.package.tables}
        model.applied_steps.update(dict.fromkeys(model.package.tables, base))
        self.dense_cursor = TableCursor("dense", have=base)
        for t in self.cursors:
            self.metrics.step.labels(t).set(base)

    # -- loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.poll() and self._on_applied is not None:
                    self._on_applied()
            except redis.RedisError as e:
                self.metrics.redis_errors.inc()
                log.warning("delta follower: Redis %s unreachable (%s); retrying", self.settings.redis_url, e)
                self._stop.wait(self.settings.retry_s)
            except Exception:
                log.exception("delta follower failed; retrying")
                self._stop.wait(self.settings.retry_s)

    def poll(self, block: bool = True) -> int:
        """One XREAD over every table's stream; applies what arrived; returns the entries applied."""
        ns = self.settings.namespace
        keys = {stream_key(ns, t): c for t, c in self.cursors.items()}
        keys[dense_key(ns)] = self.dense_cursor
        got = self.redis.xread({k: c.last_id for k, c in keys.items()}, count=self.settings.count,
                               block=self.settings.block_ms if block else None)
        applied = 0
        for key, entries in got or []:
            cursor = keys[key.decode() if isinstance(key, bytes) else key]
            for entry_id, fields in entries:
                if cursor is self.dense_cursor:
                    applied += self._apply_dense(fields)
                    cursor.last_id = entry_id
                    continue
                try:
                    applied += self._apply(cursor, fields)
                except Gap as g:
                    self._gap(str(g))
                    return applied
                cursor.last_id = entry_id
        return applied

    def _apply(self, cursor: TableCursor, fields: dict) -> int:
        try:
            d = decode(fields)
        except DeltaError as e:
            self.metrics.bad.labels(cursor.table).inc()
            raise Gap(f"table {cursor.table}: {e}") from None
        if d.step <= self._base:  # the snapshot (a consistent cut at its step) holds every row of it
            cursor.publishers[d.publisher] = (d.seq, d.step)
            self.metrics.skipped.labels(d.table).inc()
            return 0
        known = cursor.publishers.get(d.publisher)
        if self.degraded:
            pass  # no snapshot covers the gap: newer rows are still better than none
        elif known is not None:
            if d.seq != known[0] + 1:
                raise Gap(f"table {d.table}: publisher {d.publisher} (shard {d.shard}) seq {known[0]} -> {d.seq}")
        elif d.since > cursor.have:
            raise Gap(f"table {d.table}: shard {d.shard}'s entry holds changes after step {d.since}; this "
                      f"follower holds step {cursor.have}")
        self._write(d)
        cursor.publishers[d.publisher] = (d.seq, d.step)
        cursor.have = max(cursor.have, d.step)
        self._model().applied_steps[d.table] = cursor.have  # what ListModels reports
        self.metrics.step.labels(d.table).set(cursor.have)
        return 1

    def _apply_dense(self, fields: dict) -> int:
        """A newer dense state: loaded into a copy of the package's dense arch, then swapped in at once."""
        try:
            d = decode_dense(fields)
        except DeltaError as e:
            self.metrics.bad.labels("dense").inc()
            log.warning("delta follower: dense entry refused: %s", e)
            return 0
        if d.step <= self.dense_cursor.have:
            return 0
        model = self._model()
        module = copy.deepcopy(model.package.dense)
        buffers = {name for name, _ in module.named_buffers()}
        try:
            result = module.load_state_dict(d.state, strict=False)
            if result.unexpected_keys or set(result.missing_keys) - buffers:
                raise ValueError(f"unexpected {result.unexpected_keys}, missing {result.missing_keys}")
        except (RuntimeError, ValueError) as e:  # another arch, or a quantized dense arch in the package
            self.metrics.bad.labels("dense").inc()
            log.warning("delta follower: dense state of step %d does not fit the served dense arch: %s", d.step, e)
            return 0
        model.swap_dense(module)
        self.dense_cursor.have = d.step
        model.applied_steps["dense"] = d.step
        self.metrics.step.labels("dense").set(d.step)
        self.metrics.lag.labels("dense").observe(max(0.0, time.time() - d.published_at))
        return 1

    def _write(self, d: RowDelta) -> None:
        model = self._model()
        try:
            model.apply_rows(d.table, d.ids, d.rows, d.col_offset)
        except ValueError as e:
            self.metrics.bad.labels(d.table).inc()
            raise Gap(f"table {d.table}: {e}") from None
        self.metrics.entries.labels(d.table).inc()
        self.metrics.rows.labels(d.table).inc(len(d.ids))
        self.metrics.lag.labels(d.table).observe(max(0.0, time.time() - d.applied_at))

    def _gap(self, why: str) -> None:
        """Reloads the latest snapshot; if there is none newer than what is served, carries on degraded."""
        table = why.split(":")[0].removeprefix("table ")
        self.metrics.gaps.labels(table if table in self.cursors else "").inc()
        log.warning("delta follower: gap (%s); loading the latest snapshot", why)
        before = self._base
        model = self._resync()
        if model is not None and self._base_of(model) > before:
            self.metrics.resyncs.inc()
            self._start_over(model)
            return
        log.error("delta follower: no snapshot newer than step %d to resynchronise from; applying what arrives "
                  "(rows missed in the gap stay stale until a newer snapshot)", before)
        self.degraded = True
