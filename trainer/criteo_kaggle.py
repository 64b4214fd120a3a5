"""The Criteo-Kaggle-shaped embedding workload (26 tables, fixed pooling, uniform ids) of the demo and benchmarks."""

from __future__ import annotations

import torch

# Criteo Kaggle (Display Advertising Challenge) categorical cardinalities, C1..C26.
KAGGLE_CARDINALITIES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                        14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
ROW_CAP = 500_000


def tables(dim: int = 64, optimizer: str = "exact_rowwise_adagrad", lr: float = 0.01,
           cap: int = ROW_CAP) -> list[dict]:
    return [{"name": f"t{i}", "num_rows": min(rows, cap), "dim": dim, "features": [f"c{i}"],
             "optimizer": {"type": optimizer, "learning_rate": lr}}
            for i, rows in enumerate(KAGGLE_CARDINALITIES)]


def features() -> list[str]:
    return [f"c{i}" for i in range(len(KAGGLE_CARDINALITIES))]


def batch(gen: torch.Generator, batch_size: int, pooling: int, table_defs: list[dict],
          id_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed pooling factor; ids uniform per table (worst case for caches). Feature-major layout."""
    lengths = torch.full((len(table_defs) * batch_size,), pooling, dtype=id_dtype)
    values = torch.cat([torch.randint(0, t["num_rows"], (batch_size * pooling,), generator=gen, dtype=id_dtype)
                        for t in table_defs])
    return lengths, values
