"""The dynamic batching queue: concurrent requests merged into one TBE call and one dense forward.

A worker takes the oldest request and waits at most `max_wait_s` for more, up to `max_batch_size`
samples, then scores them together and splits the scores back. The queue is bounded in samples: a
request that does not fit is refused at once (RESOURCE_EXHAUSTED) instead of waiting behind a queue
that only grows. A request whose client deadline passed while queued is dropped before compute.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from inference_gateway.admission import BatchTime
from inference_gateway.model import ServingModel
from inference_gateway.requests import Decoded, segment_reorder

log = logging.getLogger(__name__)
# request arrays are read-only views over the message bytes; the kernels only read them
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class Overloaded(Exception):
    """The queue is full (or closing): the caller answers RESOURCE_EXHAUSTED / UNAVAILABLE."""


@dataclass(eq=False)  # identity: a field-wise == compares numpy arrays and raises (it killed workers)
class Pending:
    request: Decoded
    deadline: float | None  # time.monotonic() after which the client no longer waits
    token: Any  # the caller's handle (an asyncio future), passed back on delivery
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 256  # samples per merged batch (a larger single request runs alone)
    max_wait_s: float = 0.002
    max_queue_samples: int = 4096
    workers: int = 2


class Expired(Exception):
    """The request's deadline passed before compute."""


# deliver([(token, scores ndarray | Exception), ...]) runs on a worker thread
Deliver = Callable[[list[tuple[Any, Any]]], None]
Observe = Callable[[int, int, float], None]  # (batch samples, requests, seconds)


class Batcher:
    def __init__(self, model: ServingModel, config: BatchingConfig, deliver: Deliver,
                 observe: Observe | None = None, on_expired: Callable[[int], None] | None = None) -> None:
        self.model, self.config, self.deliver = model, config, deliver
        self.observe, self.on_expired = observe, on_expired
        self.busy = 0  # workers computing a batch now (admission: a request may wait for one to finish)
        self.batch_time = BatchTime()  # measured compute time of one worker's batches: admission's expected wait
        self._queue: collections.deque[Pending] = collections.deque()
        self._samples = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"batcher-{model.name}-v{model.version}-{i}",
                                          daemon=True) for i in range(config.workers)]
        for t in self._threads:
            t.start()

    @property
    def queued_samples(self) -> int:
        return self._samples

    def submit(self, item: Pending) -> None:
        b = item.request.batch_size
        with self._cond:
            if self._closed:
                raise Overloaded("model is unloading")
            if self._samples + b > self.config.max_queue_samples and self._queue:
                raise Overloaded(f"queue full: {self._samples} samples queued, max_queue_samples "
                                 f"{self.config.max_queue_samples}")
            first = not self._queue
            self._queue.append(item)
            self._samples += b
            # wake a worker only when it has something new to act on: a first request (its wait starts
            # now) or a full batch; a notify per request hands the GIL to a worker that just waits again
            if first or self._samples >= self.config.max_batch_size:
                self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Stops taking requests; the workers finish every queued one, then exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _take(self) -> list[Pending] | None:
        cfg = self.config
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            until = self._queue[0].enqueued + cfg.max_wait_s
            while self._samples < cfg.max_batch_size and not self._closed:
                left = until - time.monotonic()
                if left <= 0 or not self._queue:
                    break
                self._cond.wait(left)
            items, n = [], 0
            while self._queue and (not items or n + self._queue[0].request.batch_size <= cfg.max_batch_size):
                it = self._queue.popleft()
                n += it.request.batch_size
                items.append(it)
            self._samples -= n
            self.busy += 1  # until _run is done with these (under the lock: two workers update it)
            if self._queue:
                self._cond.notify()  # another worker can start on the rest now
            return items

    def _run(self) -> None:
        torch.set_num_threads(1)  # several workers, each one kernel thread: no oversubscription
        while True:
            items = self._take()
            if items is None:
                return
            try:
                self._process(items)
            finally:
                with self._cond:
                    self.busy -= 1

    def _process(self, items: list[Pending]) -> None:
        if not items:
            return
        now = time.monotonic()
        # a request whose client left (its future cancelled) is dropped like an expired one
        live = [it for it in items if (it.deadline is None or it.deadline > now) and not _cancelled(it.token)]
        if len(live) < len(items):
            expired = [it for it in items if it not in live]
            if self.on_expired:
                self.on_expired(len(expired))
            self.deliver([(it.token, Expired("deadline passed while queued")) for it in expired])
        if not live:
            return
        try:
            start = time.perf_counter()
            scores = self._score([it.request for it in live])
            seconds = time.perf_counter() - start
            self.batch_time.observe(len(scores), seconds)
            if self.observe:
                self.observe(len(scores), len(live), seconds)
            out, a = [], 0
            for it in live:
                b = it.request.batch_size
                out.append((it.token, scores[a : a + b]))
                a += b
            self.deliver(out)
        except Exception as e:  # a failed batch fails its requests, never the worker
            log.exception("batch of %d requests failed", len(live))
            self.deliver([(it.token, e) for it in live])

    def _score(self, reqs: list[Decoded]) -> np.ndarray:
        return self.model.scores(*merge(reqs)).numpy()


def merge(reqs: list[Decoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated requests -> one batch (dense [B, D], lengths [F * B] and values, feature-major) for
    ServingModel.scores; the scores come back in request order."""
    if len(reqs) == 1:
        r = reqs[0]
        dense, lengths, values = r.dense, r.lengths.ravel(), r.values
    else:
        dense = np.concatenate([r.dense for r in reqs])
        lengths = np.concatenate([r.lengths for r in reqs], axis=1).ravel()
        counts = np.stack([r.counts for r in reqs])  # [n, F]: segments request-major
        n, nfeat = counts.shape
        order = np.arange(n * nfeat).reshape(n, nfeat).T.ravel()  # -> feature-major
        values = segment_reorder(np.concatenate([r.values for r in reqs]), counts.ravel(), order)
    return torch.from_numpy(np.ascontiguousarray(dense)), torch.from_numpy(lengths), torch.from_numpy(values)


def _cancelled(token: Any) -> bool:
    cancelled = getattr(token, "cancelled", None)
    return bool(cancelled()) if callable(cancelled) else False
