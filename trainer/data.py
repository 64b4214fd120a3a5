"""Training data: a synthetic generator drawn from a fixed random teacher DLRM, and metrics.

The teacher knows P(y=1) for every sample, so the best AUC any model can reach on its data is known
(`teacher_auc`): a trained model's held-out AUC is judged against it. Ids are Zipf-distributed over
each table (a fixed random permutation decides which ids are hot), like real categorical features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from protos.model_config import ModelConfig
from trainer.batch import Batch, SparseBatch

TRAIN, HELDOUT = 0, 1


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SyntheticData:
    def __init__(self, config: ModelConfig, seed: int = 0, pooling_factor: int = 1, zipf_exponent: float = 1.05,
                 teacher_dim: int = 4, logit_scale: float = 1.8, logit_bias: float = -1.0) -> None:
        if pooling_factor < 1:
            raise ValueError(f"pooling_factor: must be >= 1, got {pooling_factor}")
        self.config, self.seed, self.pooling = config, seed, pooling_factor
        self.features = config.features
        g = torch.Generator().manual_seed(_seed(seed, "teacher"))
        self.cdf: dict[str, torch.Tensor] = {}
        self.perm: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        for t in config.tables:
            weights = 1.0 / torch.arange(1, t.num_rows + 1, dtype=torch.float64) ** zipf_exponent
            self.cdf[t.name] = torch.cumsum(weights / weights.sum(), 0)
            self.perm[t.name] = torch.randperm(t.num_rows, generator=g)
            self.teacher[t.name] = torch.randn(t.num_rows, teacher_dim, generator=g)
        self.w_dense = torch.randn(config.dense_features, generator=g)
        self.w_sparse = torch.randn(len(self.features), teacher_dim, generator=g)
        self.norm = (config.dense_features + len(self.features) * teacher_dim * pooling_factor) ** 0.5
        self.scale, self.bias = logit_scale, logit_bias

    def batch(self, index: int, batch_size: int, stream: int = TRAIN) -> Batch:
        """Batch `index` of a stream: the same whatever was generated before (resumable, shardable)."""
        g = torch.Generator().manual_seed(_seed(self.seed, stream, index, batch_size))
        dense = torch.randn(batch_size, self.config.dense_features, generator=g)
        lengths = torch.full((len(self.features) * batch_size,), self.pooling, dtype=torch.int64)
        values = []
        for f in self.features:
            u = torch.rand(batch_size * self.pooling, generator=g, dtype=torch.float64)
            rank = torch.searchsorted(self.cdf[f.table], u).clamp_(max=f.num_rows - 1)
            values.append(self.perm[f.table][rank])
        sparse = SparseBatch([f.name for f in self.features], lengths, torch.cat(values))
        probs = self.probabilities(dense, sparse)
        labels = torch.bernoulli(probs, generator=g)
        return Batch(dense, sparse, labels)

    def probabilities(self, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        """The teacher's P(y=1): the best any model can predict."""
        score = dense @ self.w_dense
        offs = sparse.offsets()
        b = sparse.batch_size
        for i, f in enumerate(self.features):
            lengths = sparse.lengths.view(len(self.features), b)[i]
            bag = torch.repeat_interleave(torch.arange(b), lengths)
            rows = self.teacher[f.table][sparse.values[offs[i] : offs[i + 1]]]
            pooled = torch.zeros(b, rows.shape[1]).index_add_(0, bag, rows)
            score = score + pooled @ self.w_sparse[i]
        return torch.sigmoid(self.scale * score / self.norm + self.bias)

    def batches(self, batch_size: int, num_batches: int, start: int = 0, stream: int = TRAIN) -> Iterator[Batch]:
        for i in range(start, start + num_batches):
            yield self.batch(i, batch_size, stream)

    def teacher_auc(self, num_samples: int = 20_000, batch_size: int = 2048) -> float:
        """AUC of the teacher's own probabilities on the held-out stream."""
        scores, labels = [], []
        for b in self.batches(batch_size, max(1, num_samples // batch_size), stream=HELDOUT):
            scores.append(self.probabilities(b.dense, b.sparse))
            labels.append(b.labels)
        return auc(torch.cat(scores), torch.cat(labels))


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve by ranks (Mann-Whitney U); tied scores share their average rank."""
    scores, labels = scores.double().flatten(), labels.double().flatten()
    n_pos = float(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auc: needs both positive and negative labels")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    # tied scores get the average of the ranks they span
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    avg = (first + first + counts - 1).double() / 2
    ranks[order] = avg[inverse]
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def normalized_entropy(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean log loss over the entropy of the base rate (NE < 1: better than predicting the CTR)."""
    p = probs.double().clamp(eps, 1 - eps)
    y = labels.double()
    loss = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    base = y.mean().clamp(eps, 1 - eps)
    return float(loss / (-(base * base.log() + (1 - base) * (1 - base).log())))
