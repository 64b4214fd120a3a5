"""Admission control: refuse at arrival what the queue cannot serve in time.

A request that joins a queue it cannot get through before its bound is worse than refused: it waits,
is cancelled late, and its wait lengthens everyone else's. So each request's expected wait (samples
queued ahead / the measured service rate) is compared on arrival with the configured bound
(`--max-queue-wait-ms`) and with the request's own deadline; past either it is answered
RESOURCE_EXHAUSTED at once, with the expected wait and the bound in the message.

Pure logic (no gRPC), shared by every frontend that queues into a `Batcher`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionConfig:
    max_queue_wait_s: float = 0.0  # 0: no bound of its own (deadlines still apply)
    ewma_alpha: float = 0.2  # weight of the newest batch in the service-rate estimate


class Refused(Exception):
    """The expected wait is past the bound or the deadline; `message` says which and by how much."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message, self.reason = message, reason  # reason: "max_queue_wait" or "deadline"


class ServiceRate:
    """Samples per second one batching worker computes: EWMAs of batch samples and of batch seconds
    (their ratio weights a batch by its size, so a trickle of single-sample batches under light load
    does not make a loaded queue look slow). Unknown (None) until the first batch ran."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._samples = 0.0
        self._seconds = 0.0
        self._lock = threading.Lock()  # several worker threads observe

    def observe(self, samples: int, seconds: float) -> None:
        with self._lock:
            if self._seconds == 0.0:
                self._samples, self._seconds = float(samples), max(seconds, 1e-6)
            else:
                a = self.alpha
                self._samples += a * (samples - self._samples)
                self._seconds += a * (max(seconds, 1e-6) - self._seconds)

    @property
    def per_second(self) -> float | None:
        s = self._seconds  # read without the lock: a stale pair only shifts one estimate slightly
        return self._samples / s if s > 0 else None


class Admission:
    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config

    def expected_wait(self, queued_samples: int, rate: ServiceRate, workers: int) -> float | None:
        """Seconds until the queue ahead of a new request is computed; None before any measurement."""
        per_second = rate.per_second
        if per_second is None or queued_samples <= 0:
            return None if per_second is None else 0.0
        return queued_samples / (per_second * max(workers, 1))

    def check(self, queued_samples: int, rate: ServiceRate, workers: int, remaining_s: float | None) -> None:
        """Raises Refused when the expected wait is past the bound or the request's remaining deadline."""
        wait = self.expected_wait(queued_samples, rate, workers)
        if not wait:
            return
        bound = self.config.max_queue_wait_s
        if bound and wait > bound:
            raise Refused(f"overloaded: expected queue wait {wait * 1000:.1f} ms ({queued_samples} samples queued) "
                          f"exceeds max_queue_wait_ms {bound * 1000:g}", "max_queue_wait")
        if remaining_s is not None and wait > remaining_s:
            raise Refused(f"overloaded: expected queue wait {wait * 1000:.1f} ms ({queued_samples} samples queued) "
                          f"exceeds the request's remaining deadline {max(remaining_s, 0) * 1000:.1f} ms",
                          "deadline")
