"""Data-parallel tables (TorchRec's DATA_PARALLEL): small tables replicated in every trainer.

They train like dense parameters: DDP averages their gradients, and each table's optimizer is the
plain-torch form of its fbgemm one (exact SGD, exact Adagrad, exact row-wise Adagrad: with dense
gradients, untouched rows get a zero gradient and stay unchanged, as in the fused kernels).
"""

from __future__ import annotations

import torch
from torch import nn

from protos import common_pb2
from protos.model_config import ModelConfig
from protos.table_init import initial_rows
from trainer.batch import SparseBatch


class RowWiseAdagrad(torch.optim.Optimizer):
    """state += mean(g^2) per row; w -= lr * g / (sqrt(state) + eps)."""

    def __init__(self, params, lr: float, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=p.dtype)
                g = p.grad
                state["sum"] += (g * g).mean(dim=1)
                p -= group["lr"] * g / (state["sum"].sqrt() + group["eps"])[:, None]


class MultiOptimizer:
    """Several torch optimizers stepped as one (dense SGD plus one per data-parallel table)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> list[dict]:
        return [o.state_dict() for o in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for o, s in zip(self.optimizers, states, strict=True):
            o.load_state_dict(s)


def table_optimizer(table: common_pb2.TableConfig, params) -> torch.optim.Optimizer:
    o = table.optimizer
    eps = o.eps or 1e-8
    kind = o.type or common_pb2.EXACT_SGD
    if kind == common_pb2.EXACT_SGD:
        return torch.optim.SGD(params, lr=o.learning_rate)
    if kind == common_pb2.EXACT_ADAGRAD:
        return torch.optim.Adagrad(params, lr=o.learning_rate, eps=eps)
    if kind == common_pb2.EXACT_ROWWISE_ADAGRAD:
        return RowWiseAdagrad(params, lr=o.learning_rate, eps=eps)
    raise ValueError(f"table {table.name!r}: optimizer {common_pb2.OptimizerType.Name(kind)} is not available "
                     "for data_parallel tables")


class LocalTables(nn.Module):
    def __init__(self, config: ModelConfig, tables: list[str], seed: int = 0) -> None:
        super().__init__()
        self.dim = config.embedding_dim
        self.configs = [config.table(n) for n in tables]
        self.bags = nn.ModuleDict()
        for t in self.configs:
            mode = "mean" if t.pooling == common_pb2.MEAN else "sum"
            bag = nn.EmbeddingBag(t.num_rows, t.dim, mode=mode)
            with torch.no_grad():
                bag.weight.copy_(initial_rows(t, seed, 0, t.num_rows, 0, t.dim))  # as a shard would start it
            self.bags[t.name] = bag
        self.features = [(i, f.name, f.table) for i, f in enumerate(config.features) if f.table in set(tables)]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [table_optimizer(t, self.bags[t.name].parameters()) for t in self.configs]

    def forward(self, sparse: SparseBatch, embeddings: torch.Tensor) -> torch.Tensor:
        """Fills the data-parallel features' columns of [B, F * D] (the shards left them zero)."""
        blocks = list(embeddings.split(self.dim, dim=1))
        for i, name, table in self.features:
            lengths, values, weights = sparse.feature(name)
            offsets = torch.cumsum(lengths, 0) - lengths
            blocks[i] = self.bags[table](values, offsets, per_sample_weights=weights)
        return torch.cat(blocks, dim=1)


class Replicated(nn.Module):
    """Everything every trainer holds a copy of: what DDP wraps."""

    def __init__(self, dense: nn.Module, local: LocalTables | None) -> None:
        super().__init__()
        self.dense, self.local = dense, local

    def forward(self, dense_x: torch.Tensor, embeddings: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        if self.local is not None:
            embeddings = self.local(sparse, embeddings)
        return self.dense(dense_x, embeddings)
