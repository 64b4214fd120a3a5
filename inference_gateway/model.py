"""A loaded package ready to score: quantized lookups in one IntNBit TBE, then the TorchScript dense arch.

Inputs are the merged batch of many requests, already validated and in package feature order:
dense [B, dense_features] float32, lengths [F * B] feature-major, values (ids), so one TBE call and one
dense forward serve every request of the batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from inference_gateway.package import Package
from inference_gateway.shared_tables import build_tbe, map_image


class ServingModel:
    def __init__(self, package: Package, device: str = "cpu", table_image: str | Path | None = None) -> None:
        """table_image: the package's TBE host buffer written by shared_tables.write_image; mapped
        instead of copying the package's rows (which then need not have been read)."""
        self.package = package
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda requested but torch.cuda.is_available() is False")
        self.name, self.version = package.name, package.version
        self.features = [f.name for f in package.features]
        self.feature_index = {n: i for i, n in enumerate(self.features)}
        self.dense_features = package.dense_features
        # rows of the table each feature looks up, in feature order (validation bounds)
        self.rows_per_feature = np.array([package.tables[f.table].num_rows for f in package.features], dtype=np.int64)
        self.tbe = build_tbe(package, self.device)
        self.mapped = None
        if table_image is not None:
            if self.device.type != "cpu":
                raise ValueError("table_image: a shared table image serves CPU workers only")
            self.mapped = map_image(self.tbe, table_image)  # read-only, shared with every other worker
        else:
            self.tbe.initialize_weights()
            with torch.no_grad():
                for t, (dest, _) in zip(package.tables.values(), self.tbe.split_embedding_weights(
                        split_scale_shifts=False), strict=True):
                    dest[:, : t.row_bytes].copy_(package.rows[t.name])
        self.dense = package.dense.to(self.device)
        self.table_bytes = package.table_bytes

    @torch.inference_mode()
    def scores(self, dense: torch.Tensor, lengths: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """P(click) [B] for a validated batch (lengths feature-major over the package's features)."""
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        if values.dtype != torch.int64:
            values = values.long()
        dev = self.device
        emb = self.tbe(values.to(dev), offsets.to(dev))
        return torch.sigmoid(self.dense(dense.to(dev), emb)).cpu()
