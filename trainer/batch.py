"""Batches as the trainer sees them: dense features, a keyed jagged batch of ids, labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseBatch:
    """Like TorchRec's KeyedJaggedTensor: `lengths` is feature-major ([F * B]: all bags of keys[0],
    then keys[1], ...), `values` the ids of every bag in that order, `weights` optional per id."""

    keys: list[str]
    lengths: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("keys: empty")
        if self.lengths.dim() != 1:
            raise ValueError(f"lengths: expected 1-D [len(keys) * batch], got shape {list(self.lengths.shape)}")
        if self.lengths.numel() % len(self.keys):
            raise ValueError(f"lengths: {self.lengths.numel()} entries do not split over {len(self.keys)} keys")
        if int(self.lengths.sum()) != self.values.numel():
            raise ValueError(f"lengths add up to {int(self.lengths.sum())} but values holds {self.values.numel()}")
        if self.weights is not None and self.weights.shape != self.values.shape:
            raise ValueError(f"weights: shape {list(self.weights.shape)} != values {list(self.values.shape)}")

    @property
    def batch_size(self) -> int:
        return self.lengths.numel() // len(self.keys)

    def offsets(self) -> list[int]:
        per = self.lengths.view(len(self.keys), -1).sum(1)
        return [0, *torch.cumsum(per, 0).tolist()]

    def feature(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        i = self.keys.index(key)
        offs = self.offsets()
        w = None if self.weights is None else self.weights[offs[i] : offs[i + 1]]
        return self.lengths.view(len(self.keys), -1)[i], self.values[offs[i] : offs[i + 1]], w

    def split(self, sizes: list[int]) -> list[SparseBatch]:
        """Samples [sum(sizes[:i]), sum(sizes[:i+1])) of every feature, for trainer i."""
        if sum(sizes) != self.batch_size:
            raise ValueError(f"sizes: {sizes} do not add up to the batch size {self.batch_size}")
        n_feat, batch = len(self.keys), self.batch_size
        lengths = self.lengths.view(n_feat, batch)
        starts = [0, *torch.cumsum(self.lengths, 0).tolist()]  # value offset of every bag, and the end
        out, b0 = [], 0
        for n in sizes:
            ls, vs, ws = [], [], []
            for f in range(n_feat):
                start, end = starts[f * batch + b0], starts[f * batch + b0 + n]
                ls.append(lengths[f, b0 : b0 + n])
                vs.append(self.values[start:end])
                if self.weights is not None:
                    ws.append(self.weights[start:end])
            out.append(SparseBatch(list(self.keys), torch.cat(ls), torch.cat(vs), torch.cat(ws) if ws else None))
            b0 += n
        return out

    @staticmethod
    def concat(batches: list[SparseBatch]) -> SparseBatch:
        """Inverse of split: the batches side by side, feature by feature."""
        keys = batches[0].keys
        offs = [b.offsets() for b in batches]
        lengths = torch.cat([b.lengths.view(len(keys), -1) for b in batches], dim=1).flatten()
        values = torch.cat([b.values[o[f] : o[f + 1]] for f in range(len(keys))
                            for b, o in zip(batches, offs, strict=True)])
        weights = None
        if batches[0].weights is not None:
            weights = torch.cat([b.weights[o[f] : o[f + 1]] for f in range(len(keys))
                                 for b, o in zip(batches, offs, strict=True)])
        return SparseBatch(list(keys), lengths, values, weights)


@dataclass
class Batch:
    dense: torch.Tensor  # [B, dense_features] float32
    sparse: SparseBatch
    labels: torch.Tensor  # [B] float32

    @property
    def batch_size(self) -> int:
        return self.labels.numel()

    def split(self, sizes: list[int]) -> list[Batch]:
        parts = self.sparse.split(sizes)
        dense = torch.split(self.dense, sizes)
        labels = torch.split(self.labels, sizes)
        return [Batch(d, s, y) for d, s, y in zip(dense, parts, labels, strict=True)]
