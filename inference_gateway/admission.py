"""Admission control: refuse at arrival what the queue cannot serve in time.

A request that joins a queue it cannot get through before its bound is worse than refused: it waits,
is cancelled late, and its wait lengthens everyone else's. So each request's expected wait (the compute
time of the full batches queued ahead of it, from the measured batch times) is compared on arrival with
the configured bound (`--max-queue-wait-ms`), and the wait plus its own batch's compute with the
request's own deadline; past either it is answered
RESOURCE_EXHAUSTED at once, with the expected wait and the bound in the message.

Pure logic (no gRPC), shared by every frontend that queues into a `Batcher`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionConfig:
    max_queue_wait_s: float = 0.0  # 0: no bound of its own (deadlines still apply)


class Refused(Exception):
    """The expected wait is past the bound or the deadline; `message` says which and by how much."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message, self.reason = message, reason  # reason: "max_queue_wait" or "deadline"


class BatchTime:
    """Seconds one batching worker takes for a batch of n samples, t(n) = fixed + per_sample * n, fitted
    to the batches it ran by least squares over exponentially weighted moments (recent batches count
    most). The fixed part matters: under light load batches are small and mostly overhead, so a plain
    samples-per-second rate would make a queue of many small requests look slower than it is. Until
    the batch sizes vary, t(n) is proportional to n. Unknown (None) until the first batch ran."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._m: tuple[float, float, float, float] | None = None  # E[n], E[t], E[n^2], E[n t]
        self._lock = threading.Lock()  # several worker threads observe

    def observe(self, samples: int, seconds: float) -> None:
        x = (float(samples), seconds, float(samples) ** 2, samples * seconds)
        with self._lock:
            if self._m is None:
                self._m = x
            else:
                a = self.alpha
                self._m = tuple(m + a * (v - m) for m, v in zip(self._m, x, strict=True))

    def model(self) -> tuple[float, float, float] | None:
        """(fixed seconds, seconds per sample, seconds of an average batch), or None before any batch."""
        m = self._m  # one tuple, replaced whole: no lock needed to read it
        if m is None:
            return None
        n, t, n2, nt = m
        var = n2 - n * n
        if var > 0.01 * n * n:  # sizes vary enough to separate the fixed part from the per-sample part
            per_sample = max((nt - n * t) / var, 0.0)
            fixed = max(t - per_sample * n, 0.0)
            return fixed, per_sample, t
        return 0.0, t / max(n, 1.0), t


@dataclass(frozen=True)
class Expected:
    wait_s: float  # until the batch the request joins starts computing
    compute_s: float  # that batch's compute


class Admission:
    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config

    @staticmethod
    def expected(queued_samples: int, time: BatchTime, max_batch: int, workers: int, busy: int) -> Expected | None:
        """A new request joins the batch after the full batches (of max_batch samples) queued ahead of it;
        it starts once the workers (`busy` of them computing now, half done on average) got through
        those, and then computes for t(its batch). None before any batch was measured."""
        fit = time.model()
        if fit is None:
            return None
        fixed, per_sample, average = fit
        max_batch, workers = max(max_batch, 1), max(workers, 1)
        ahead, rest = divmod(max(queued_samples, 0), max_batch)
        wait = ahead * (fixed + per_sample * max_batch) / workers
        if busy >= workers:
            wait += average / 2
        return Expected(wait, fixed + per_sample * max(rest, 1))

    def check(self, queued_samples: int, time: BatchTime, max_batch: int, workers: int, busy: int,
              remaining_s: float | None) -> None:
        """Raises Refused when the expected wait is past the bound, or wait and compute past the request's
        remaining deadline."""
        e = self.expected(queued_samples, time, max_batch, workers, busy)
        if e is None:
            return
        bound = self.config.max_queue_wait_s
        if bound and e.wait_s > bound:
            raise Refused(f"overloaded: expected queue wait {e.wait_s * 1000:.1f} ms ({queued_samples} samples "
                          f"queued) exceeds max_queue_wait_ms {bound * 1000:g}", "max_queue_wait")
        if remaining_s is not None and e.wait_s + e.compute_s > remaining_s:
            raise Refused(f"overloaded: expected queue wait {e.wait_s * 1000:.1f} ms + compute "
                          f"{e.compute_s * 1000:.1f} ms ({queued_samples} samples queued) exceeds the request's "
                          f"remaining deadline {max(remaining_s, 0) * 1000:.1f} ms", "deadline")
