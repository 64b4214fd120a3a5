"""The collective transport's header codes and status round (the protocol is described in
embedding_service/collective.py).

Each round starts with an int64 [3] header per (trainer, shard) pair: number of lengths, number of
ids, and the next batch's step, or one of these codes. Before the embeddings go back, every rank joins
a status round, so that a shard-side failure reaches every trainer (and every other shard) as an error
naming the shard and the step, instead of a shard leaving the group while the others block.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

PAUSE = -2  # no next batch: the shards apply the current gradients and wait
STOP = -1  # the job is over: the shards leave the collective loop

STATUS_MESSAGE_BYTES = 480  # a failure's message, UTF-8, truncated to this many bytes
_STATUS_WIDTH = 2 + STATUS_MESSAGE_BYTES // 8  # int64 per shard: failed (0/1), step, message bytes
DEFAULT_TIMEOUT_S = 300.0  # a collective that waits longer (a frozen peer) raises instead of hanging


@dataclass(frozen=True)
class ShardFailure:
    """A shard's failure as the status round reports it to every rank."""

    shard: int
    step: int
    message: str

    def __str__(self) -> str:
        return f"shard {self.shard} failed at step {self.step}: {self.message}"


def exchange(send: torch.Tensor, send_splits: list[int], recv_splits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """One `all_to_all_single` of the protocol: `send_splits[r]` elements to rank r, `recv_splits[r]` from it."""
    out = torch.empty(sum(recv_splits), dtype=dtype)
    dist.all_to_all_single(out, send, output_split_sizes=recv_splits, input_split_sizes=send_splits)
    return out


def status_round(num_shards: int, failure: ShardFailure | None = None) -> list[ShardFailure]:
    """Every rank calls this once per round (trainers and healthy shards with `failure` None); returns
    every shard's failure of the round. One all-reduce (sum) over the whole group: each shard writes
    only its own row, so the sum is every row."""
    table = torch.zeros(num_shards, _STATUS_WIDTH, dtype=torch.int64)
    if failure is not None:
        row = table.numpy()[failure.shard]
        row[0], row[1] = 1, failure.step
        raw = failure.message.encode("utf-8", errors="replace")[:STATUS_MESSAGE_BYTES]
        row[2:].view(np.uint8)[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    dist.all_reduce(table)
    out = []
    for shard, row in enumerate(table.numpy()):
        if row[0]:
            msg = row[2:].view(np.uint8).tobytes().rstrip(b"\0").decode("utf-8", errors="replace")
            out.append(ShardFailure(shard, int(row[1]), msg))
    return out


def timeout(seconds: float | None) -> datetime.timedelta:
    """The process group's timeout: no collective waits longer for a peer (gloo's default is 30 minutes)."""
    return datetime.timedelta(seconds=seconds or DEFAULT_TIMEOUT_S)
