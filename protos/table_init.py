"""Seeded table initialisation: the same initial rows whatever the sharding, in every component.

A shard fills its slices with these rows, a trainer its data-parallel tables, and the tests their
references; so a row's initial value depends only on (seed, table, row), never on which process holds
it or how the table was cut.
"""

from __future__ import annotations

import hashlib

import torch

from protos import common_pb2

INIT_CHUNK_ROWS = 65536


def init_seed(seed: int, table: str, chunk: int) -> int:
    """The generator seed of one chunk of rows of one table."""
    digest = hashlib.sha256(f"{seed}:{table}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_rows(table: common_pb2.TableConfig, seed: int, row_start: int, row_end: int,
                 col_start: int, col_end: int) -> torch.Tensor:
    """Initial weights of a rectangle of a table: the same values whatever the sharding.

    Rows are drawn in fixed chunks of INIT_CHUNK_ROWS, each from its own seed, so a slice only draws
    the chunks it overlaps.
    """
    lo, hi = table.init_min, table.init_max
    if lo == 0 and hi == 0:
        bound = (1.0 / table.num_rows) ** 0.5
        lo, hi = -bound, bound
    out = torch.empty(row_end - row_start, col_end - col_start)
    gen = torch.Generator()
    for chunk in range(row_start // INIT_CHUNK_ROWS, (row_end - 1) // INIT_CHUNK_ROWS + 1):
        c0 = chunk * INIT_CHUNK_ROWS
        c1 = min(c0 + INIT_CHUNK_ROWS, table.num_rows)
        gen.manual_seed(init_seed(seed, table.name, chunk))
        block = torch.empty(c1 - c0, table.dim).uniform_(lo, hi, generator=gen)
        r0, r1 = max(c0, row_start), min(c1, row_end)
        out[r0 - row_start : r1 - row_start] = block[r0 - c0 : r1 - c0, col_start:col_end]
    return out
