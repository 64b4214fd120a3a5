"""Model packages: quantized row layout, verified loading, and refusal of corrupt or incompatible ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from inference_gateway.model import ServingModel
from protos.model_config import ModelConfig
from protos.package import PackageError, load_package
from protos.quantize import DenseQuantization, TableDType, quantize_table, row_bytes
from trainer.data import SyntheticData
from trainer.export import ExportedModel, export_package, table_dtypes
from trainer.model import DenseDLRM

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelConfig.load(ROOT / "configs" / "tiny.yaml")


def tiny_model(seed: int = 0) -> ExportedModel:
    g = torch.Generator().manual_seed(seed)
    return ExportedModel(TINY, DenseDLRM(TINY, seed=seed),
                         {t.name: torch.randn(t.num_rows, t.dim, generator=g) for t in TINY.tables}, step=0)


def two_versions(root: Path, v1: str = "int8", v2: str = "int8") -> Path:
    """A model store with the tiny model's packages `v1` (seed 0, tables at dtype v1) and `v2` (seed 1)."""
    export_package(tiny_model(0), root / "v1", dtypes=table_dtypes(TINY, v1, []), version=1)
    export_package(tiny_model(1), root / "v2", dtypes=table_dtypes(TINY, v2, []), version=2)
    return root


def reference_scores(model: ExportedModel, batch) -> torch.Tensor:
    blocks = []
    for f in TINY.features:
        lengths, values, _ = batch.sparse.feature(f.name)
        blocks.append(F.embedding_bag(values, model.tables[f.table], torch.cumsum(lengths, 0) - lengths, mode="sum"))
    with torch.no_grad():
        return torch.sigmoid(model.dense(batch.dense, torch.cat(blocks, 1)))


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    model = tiny_model()
    out = {}
    for q in ("fp32", "fp16", "int8", "int4", "int2"):
        out[q] = export_package(model, root / q, dtypes=table_dtypes(TINY, q, []))
    out["int8-dense"] = export_package(model, root / "int8-dense", dtypes=table_dtypes(TINY, "int8", []),
                                       dense_quantization=DenseQuantization.INT8)
    return model, out


def test_row_layout_sizes_match_fbgemm():
    w = torch.randn(10, 64)
    assert [quantize_table(w, d).shape[1] for d in TableDType] == [256, 128, 68, 36, 20]
    assert row_bytes(64, TableDType.INT4) == 36


def test_scores_follow_dtype_precision(packages):
    model, pkgs = packages
    batch = SyntheticData(TINY, seed=3, pooling_factor=2).batch(0, 128)
    ref = reference_scores(model, batch)
    errors = {}
    for q, path in pkgs.items():
        served = ServingModel(load_package(path))
        errors[q] = float((served.scores(batch.dense, batch.sparse.lengths, batch.sparse.values) - ref).abs().max())
    assert errors["fp32"] < 1e-6
    assert errors["fp16"] < errors["int8"] < errors["int4"] < errors["int2"]
    assert 0 < errors["int8-dense"] < 0.05


def test_manifest_names_everything(packages):
    _, pkgs = packages
    pkg = load_package(pkgs["int4"])
    m = pkg.manifest
    assert [f["name"] for f in m["features"]] == [f.name for f in TINY.features]
    assert {t["dtype"] for t in m["tables"]} == {"int4"}
    assert set(m["files"]) == {"dense.pt", *(f"tables/{t.name}.bin" for t in TINY.tables)}
    assert m["batching"]["id_list_features"] == {"type": "sparse", "device": "cpu", "pinned": []}
    # the dense arch loads as TorchScript alone, without the project's model classes
    scripted = torch.jit.load(str(pkgs["int4"] / "dense.pt"))
    assert scripted(torch.zeros(2, 4), torch.zeros(2, 5 * 8)).shape == (2,)


def test_per_table_dtypes():
    dtypes = table_dtypes(TINY, "int8", ["users=int4", "hours=fp16"])
    assert dtypes["users"] is TableDType.INT4 and dtypes["hours"] is TableDType.FP16
    assert dtypes["items"] is TableDType.INT8
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        table_dtypes(TINY, "int8", ["nope=int4"])
    with pytest.raises(ValueError, match="int3"):
        table_dtypes(TINY, "int3", [])


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_is_refused(packages, tmp_path):
    pkg = _copy(packages[1]["int8"], tmp_path / "p")
    f = pkg / "tables" / "items.bin"
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"items\.bin: sha256 mismatch"):
        load_package(pkg)


def test_missing_and_truncated_files_are_refused(packages, tmp_path):
    pkg = _copy(packages[1]["int8"], tmp_path / "p")
    (pkg / "dense.pt").unlink()
    with pytest.raises(PackageError, match=r"dense\.pt: missing"):
        load_package(pkg)
    pkg2 = _copy(packages[1]["int8"], tmp_path / "p2")
    f = pkg2 / "tables" / "users.bin"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(PackageError, match=r"users\.bin: \d+ bytes, manifest.json says \d+ \(truncated"):
        load_package(pkg2)
    with pytest.raises(PackageError, match=r"no manifest\.json"):
        load_package(tmp_path)


def test_incompatible_manifest_is_refused(packages, tmp_path):
    pkg = _copy(packages[1]["int8"], tmp_path / "p")
    manifest = json.loads((pkg / "manifest.json").read_text())
    (pkg / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(PackageError, match="format_version 2; this loader reads 1"):
        load_package(pkg)
    manifest["tables"][0]["dtype"] = "int3"
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="'int3' is not one of"):
        load_package(pkg)
    (pkg / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="corrupt"):
        load_package(pkg)


def test_export_refuses_to_overwrite_and_replaces_with_force(packages):
    model, pkgs = packages
    with pytest.raises(PackageError, match="exists"):
        export_package(model, pkgs["fp32"], dtypes=table_dtypes(TINY, "fp32", []))
    export_package(model, pkgs["fp32"], dtypes=table_dtypes(TINY, "fp32", []), version=2, overwrite=True)
    assert load_package(pkgs["fp32"]).version == 2
    assert not [p for p in pkgs["fp32"].parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
