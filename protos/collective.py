"""The collective transport's header codes (the protocol is described in embedding_service/collective.py).

Each round starts with an int64 [3] header per (trainer, shard) pair: number of lengths, number of
ids, and the next batch's step, or one of these codes.
"""

PAUSE = -2  # no next batch: the shards apply the current gradients and wait
STOP = -1  # the job is over: the shards leave the collective loop
