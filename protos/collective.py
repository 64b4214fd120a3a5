"""The collective transport's header codes (the protocol is described in embedding_service/collective.py).

Each round starts with an int64 [3] header per (trainer, shard) pair: number of lengths, number of
ids, and the next batch's step, or one of these codes.
"""

import torch
import torch.distributed as dist

PAUSE = -2  # no next batch: the shards apply the current gradients and wait
STOP = -1  # the job is over: the shards leave the collective loop


def exchange(send: torch.Tensor, send_splits: list[int], recv_splits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """One `all_to_all_single` of the protocol: `send_splits[r]` elements to rank r, `recv_splits[r]` from it."""
    out = torch.empty(sum(recv_splits), dtype=dtype)
    dist.all_to_all_single(out, send, output_split_sizes=recv_splits, input_split_sizes=send_splits)
    return out
