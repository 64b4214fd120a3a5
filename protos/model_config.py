"""The model configuration every component reads: embedding tables and the dense DLRM architecture (YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from protos import common_pb2
from protos.cli_errors import file_error
from protos.plan import assignment_from_dict, validate_assignment


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse input feature and the table it looks up."""

    name: str
    table: str
    dim: int
    num_rows: int


@dataclass
class ModelConfig:
    """A DLRM: `dense_features` dense inputs through the bottom MLP, one pooled embedding per sparse
    feature, pairwise dot interaction, top MLP to one logit."""

    tables: list[common_pb2.TableConfig]
    dense_features: int = 13
    bottom_mlp: list[int] = field(default_factory=lambda: [512, 256, 64])
    top_mlp: list[int] = field(default_factory=lambda: [512, 256, 1])
    dense_lr: float = 0.1
    # tables kept whole in every trainer (TorchRec's data_parallel) instead of in the shards
    data_parallel: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        a = common_pb2.ShardAssignment(tables=self.tables)
        for t in self.tables:
            a.slices.add(table=t.name, num_rows=t.num_rows, num_cols=t.dim)
        validate_assignment(a)  # names, sizes, features mapping to one table each
        dims = {t.dim for t in self.tables}
        if len(dims) != 1:
            raise ValueError(f"tables: the dot interaction needs one embedding dim, got {sorted(dims)}")
        if self.bottom_mlp[-1] != dims.pop():
            raise ValueError(f"bottom_mlp: last layer {self.bottom_mlp[-1]} must equal the embedding dim")
        if self.top_mlp[-1] != 1:
            raise ValueError("top_mlp: last layer must be 1 (one logit)")
        unknown = set(self.data_parallel) - {t.name for t in self.tables}
        if unknown:
            raise ValueError(f"data_parallel: unknown tables {sorted(unknown)}")

    @property
    def features(self) -> list[FeatureSpec]:
        """Sparse features in model order: tables in config order, each table's features in order."""
        return [FeatureSpec(f, t.name, t.dim, t.num_rows) for t in self.tables for f in t.features]

    @property
    def embedding_dim(self) -> int:
        return self.tables[0].dim

    def table(self, name: str) -> common_pb2.TableConfig:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"unknown table {name!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        raw = dict(raw)
        tables = list(assignment_from_dict({"tables": raw.pop("tables", [])}).tables)
        dense = dict(raw.pop("dense", {}) or {})
        known = {"dense_features", "bottom_mlp", "top_mlp", "dense_lr"}
        unknown = (set(dense) - known) | (set(raw) - {"data_parallel"})
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(tables=tables, data_parallel=list(raw.get("data_parallel", [])), **dense)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text())
            if not isinstance(raw, dict):
                raise ValueError("expected a mapping at the top level")
            return cls.from_dict(raw)
        except (ValueError, yaml.YAMLError) as e:
            raise file_error(path, e) from None
