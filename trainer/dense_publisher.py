"""Publishes the trainer's dense parameters every N steps (protos.deltas, `{ns}:dense`): the gateway swaps
its dense arch to them, while the embedding rows follow from the shards step by step.

Rank 0 only. The step loop copies the (small) state and hands it to a background thread; a publish still
in flight makes the next one wait for the one after (counted as skipped), and Redis being down costs
the loop nothing but a logged, counted error.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
import torch

from protos.deltas import dense_key, encode_dense

log = logging.getLogger(__name__)


class DensePublisher:
    def __init__(self, redis_url: str, every: int, namespace: str = "recsys", retention: int = 8) -> None:
        if every < 1:
            raise ValueError(f"--dense-every: must be >= 1, got {every}")
        self.every, self.key, self.retention = every, dense_key(namespace), retention
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.published = self.skipped = self.errors = 0
        self._busy = threading.Lock()

    def maybe_publish(self, step: int, module: torch.nn.Module) -> None:
        """Every `every`-th step: the module's state at `step` goes out in the background."""
        if (step + 1) % self.every:
            return
        if not self._busy.acquire(blocking=False):
            self.skipped += 1
            return
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        threading.Thread(target=self._publish, args=(step, state), name="dense-publisher", daemon=True).start()

    def _publish(self, step: int, state: dict) -> None:
        try:
            self.redis.xadd(self.key, encode_dense(step, state, time.time()), maxlen=self.retention,
                            approximate=False)
            self.published += 1
        except redis.RedisError as e:
            self.errors += 1
            log.warning("dense publish of step %d failed: %s", step, e)
        finally:
            self._busy.release()

    def close(self) -> None:
        with self._busy:  # the last publish finishes
            pass
