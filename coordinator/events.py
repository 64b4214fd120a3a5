"""Plan events fanned out to every WatchPlan stream (one queue per watcher).

A late watcher gets the open FENCE, or else the last RESUME: a trainer fenced when the coordinator died
reconnects to the restarted one after its start-up recovery published the RESUME, and must still get it
(a trainer that already resumed ignores a RESUME it has seen)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from protos import coordinator_pb2


class PlanEvents:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[queue.Queue] = []
        self.fence: coordinator_pb2.PlanEvent | None = None  # the open FENCE, replayed to late watchers
        self.resume: coordinator_pb2.PlanEvent | None = None  # the last RESUME, replayed when no FENCE is open
        self.closed = False

    def publish(self, event: coordinator_pb2.PlanEvent) -> None:
        with self._lock:
            if event.kind == coordinator_pb2.FENCE:
                self.fence = event
            elif event.kind == coordinator_pb2.RESUME:
                self.fence, self.resume = None, event
            for q in self._subscribers:
                q.put(event)

    def subscribe(self, current: coordinator_pb2.PlanEvent, is_active, poll_s: float = 0.5
                  ) -> Iterator[coordinator_pb2.PlanEvent]:
        """CURRENT first, the open FENCE (or else the last RESUME) if any, then every event until the client
        goes away."""
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._subscribers.append(q)
            pending = self.fence or self.resume
        try:
            yield current
            if pending is not None:
                yield pending
            while is_active() and not self.closed:
                try:
                    yield q.get(timeout=poll_s)
                except queue.Empty:
                    continue
        finally:
            with self._lock:
                self._subscribers.remove(q)

    def close(self) -> None:
        self.closed = True
