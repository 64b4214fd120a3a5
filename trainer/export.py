"""`trainer export`: a consistent training checkpoint -> a quantized, self-contained model package.

The checkpoint's shard directories record every slice they hold (table, row and column offsets), so
the full tables are reassembled from the shards' files alone (no plan needed) and checked to tile
each table exactly once. Data-parallel tables come from dense.pt. Every file is verified against
the checkpoint's checksums before it is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from protos.durable import file_sha256
from protos.model_config import ModelConfig
from protos.package import FeatureSpec, write_package
from protos.quantize import DenseQuantization, TableDType, pooling_name
from protos.shard_checkpoint import MANIFEST as SHARD_MANIFEST
from protos.shard_checkpoint import CheckpointFormatError, Problem, read_array, read_manifest
from trainer import checkpoint
from trainer.model import DenseDLRM


class ExportError(ValueError):
    """A checkpoint that cannot be exported; names the file, table or option."""


@dataclass
class ExportedModel:
    """What the package is built from: the trained dense arch and every table whole, in float32."""

    config: ModelConfig
    dense: DenseDLRM
    tables: dict[str, torch.Tensor]
    step: int


def _step_dir(path: Path) -> Path:
    if (path / checkpoint.MANIFEST).exists() and (path / "dense.pt").exists():
        return path
    try:
        return checkpoint.latest(path)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None


def read_checkpoint(path: str | Path, config: ModelConfig) -> ExportedModel:
    """Verifies and reassembles a job checkpoint (a step directory, or the root with LATEST)."""
    step_dir = _step_dir(Path(path))
    try:
        manifest = json.loads((step_dir / checkpoint.MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{step_dir / checkpoint.MANIFEST}: unreadable ({e})") from None
    if file_sha256(step_dir / "dense.pt") != manifest["dense_sha256"]:
        raise ExportError(f"{step_dir / 'dense.pt'}: sha256 mismatch")
    state = torch.load(step_dir / "dense.pt", weights_only=True)["model"]
    dense = DenseDLRM(config)
    dense_state = {k.removeprefix("dense."): v for k, v in state.items() if k.startswith("dense.")}
    try:
        dense.load_state_dict(dense_state)
    except RuntimeError as e:
        raise ExportError(f"{step_dir / 'dense.pt'}: does not fit the dense arch of the config ({e})") from None
    tables: dict[str, torch.Tensor] = {}
    coverage: dict[str, torch.Tensor] = {}
    for t in config.tables:
        key = f"local.bags.{t.name}.weight"
        if key in state:  # a data-parallel table, whole in every trainer
            tables[t.name] = state[key].float().clone()
            coverage[t.name] = torch.ones(t.num_rows, t.dim, dtype=torch.int32)
        else:
            tables[t.name] = torch.zeros(t.num_rows, t.dim)
            coverage[t.name] = torch.zeros(t.num_rows, t.dim, dtype=torch.int32)
    for i, digest in manifest["shard_manifest_sha256"].items():
        shard_dir = step_dir / f"shard-{i}"
        if file_sha256(shard_dir / SHARD_MANIFEST) != digest:
            raise ExportError(f"{shard_dir / SHARD_MANIFEST}: sha256 mismatch")
        _read_shard(shard_dir, config, tables, coverage)
    for name, cov in coverage.items():
        if not bool((cov == 1).all()):
            missing, twice = int((cov == 0).sum()), int((cov > 1).sum())
            raise ExportError(f"table {name!r}: the checkpoint's slices leave {missing} values uncovered and "
                              f"cover {twice} more than once")
    return ExportedModel(config, dense, tables, int(manifest["step"]))


def _read_shard(shard_dir: Path, config: ModelConfig, tables: dict[str, torch.Tensor],
                coverage: dict[str, torch.Tensor]) -> None:
    try:
        shard_manifest = read_manifest(shard_dir)
    except CheckpointFormatError as e:
        raise ExportError(str(e)) from None
    for entry in shard_manifest["slices"]:
        name = entry["table"]
        if name not in tables:
            raise ExportError(f"{shard_dir}: slice of table {name!r}, which the config does not have")
        weights = next((f for f in entry["files"] if f["kind"] == "weights"), None)
        if weights is None:
            raise ExportError(f"{shard_dir}: slice {entry['index']} of table {name!r} has no weights file")
        fpath = shard_dir / weights["name"]
        try:
            block = torch.from_numpy(read_array(shard_dir, weights, f"table {name!r}"))
        except CheckpointFormatError as e:
            if e.problem == Problem.MISSING_FILE:
                raise ExportError(f"{fpath}: missing (table {name!r})") from None
            raise ExportError(f"{fpath}: size or sha256 mismatch (table {name!r}; corrupt)") from None
        r0, nr, c0, nc = entry["row_offset"], entry["num_rows"], entry["col_offset"], entry["num_cols"]
        table = tables[name]
        if list(block.shape) != [nr, nc] or r0 + nr > table.shape[0] or c0 + nc > table.shape[1]:
            raise ExportError(f"{fpath}: slice rows {r0}+{nr} cols {c0}+{nc} ({list(block.shape)}) does not fit "
                              f"table {name!r} {list(table.shape)}")
        table[r0 : r0 + nr, c0 : c0 + nc] = block.float()
        coverage[name][r0 : r0 + nr, c0 : c0 + nc] += 1


def table_dtypes(config: ModelConfig, default: str, overrides: list[str]) -> dict[str, TableDType]:
    """--quantize DTYPE for every table, --table-dtype TABLE=DTYPE for one (per_table_weight_dtype)."""
    out = {t.name: TableDType.parse(default, "--quantize") for t in config.tables}
    for spec in overrides:
        name, _, dtype = spec.partition("=")
        if name not in out:
            raise ExportError(f"--table-dtype {spec!r}: unknown table {name!r}")
        out[name] = TableDType.parse(dtype, f"--table-dtype {name}")
    return out


def export_package(model: ExportedModel, out: str | Path, *, dtypes: dict[str, TableDType], name: str = "dlrm",
                   version: int = 1, dense_quantization: DenseQuantization = DenseQuantization.NONE,
                   out_of_range: str = "error", overwrite: bool = False, source: dict | None = None) -> Path:
    cfg = model.config
    return write_package(
        out, name=name, version=version, dense=model.dense, dense_features=cfg.dense_features,
        features=[FeatureSpec(f.name, f.table) for f in cfg.features], tables=model.tables,
        table_dims={t.name: t.dim for t in cfg.tables}, table_dtypes=dtypes,
        pooling={t.name: pooling_name(t.pooling) for t in cfg.tables}, dense_quantization=dense_quantization,
        out_of_range=out_of_range, overwrite=overwrite, source={"step": model.step, **(source or {})})
