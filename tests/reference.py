"""An independent reference: pooled lookups and fbgemm's exact optimizers written in plain torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RefTable:
    weights: torch.Tensor  # [rows, dim] float64 for a tight reference
    optimizer: str  # exact_sgd | exact_adagrad | exact_rowwise_adagrad
    lr: float
    eps: float = 1e-8
    mean: bool = False
    state: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.weights = self.weights.double().clone()
        if self.optimizer == "exact_adagrad":
            self.state = torch.zeros_like(self.weights)
        elif self.optimizer == "exact_rowwise_adagrad":
            self.state = torch.zeros(self.weights.shape[0], dtype=torch.float64)
        else:
            self.state = torch.zeros(0, dtype=torch.float64)


def pooled(t: RefTable, lengths: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    rows = t.weights[ids]
    if weights is not None:
        rows = rows * weights.double()[:, None]
    out = torch.zeros(lengths.numel(), t.weights.shape[1], dtype=torch.float64).index_add_(0, bag, rows)
    if t.mean:
        out = out / lengths.clamp(min=1).double()[:, None]
    return out


def row_grads(t: RefTable, lengths: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None,
              grad: torch.Tensor) -> torch.Tensor:
    """Per-id gradient rows (before aggregation), for one feature."""
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    g = grad.double()[bag]
    if t.mean:
        g = g / lengths.clamp(min=1).double()[bag][:, None]
    if weights is not None:
        g = g * weights.double()[:, None]
    return g


def apply(t: RefTable, ids: torch.Tensor, per_id_grads: torch.Tensor) -> None:
    """One exact update: gradients of all occurrences of a row are summed first (fbgemm 'exact')."""
    if ids.numel() == 0:
        return
    uniq, inv = torch.unique(ids, return_inverse=True)
    g = torch.zeros(uniq.numel(), t.weights.shape[1], dtype=torch.float64).index_add_(0, inv, per_id_grads)
    if t.optimizer == "exact_sgd":
        t.weights[uniq] -= t.lr * g
    elif t.optimizer == "exact_adagrad":
        t.state[uniq] += g * g
        t.weights[uniq] -= t.lr * g / (t.state[uniq].sqrt() + t.eps)
    else:
        t.state[uniq] += (g * g).mean(dim=1)
        t.weights[uniq] -= t.lr * g / (t.state[uniq].sqrt() + t.eps)[:, None]
