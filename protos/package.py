"""The model package: a self-contained, versioned, checksummed directory the gateway serves.

A directory (not one archive file) so tables can be read straight into the TBE without unpacking
and each file is verified on its own; the manifest is written last and renamed into place with the
whole directory, so a reader sees a complete package or none. Layout:

    manifest.json      format, name, version, features in order, tables (rows, dim, dtype, bytes),
                       batching metadata per input, sha256 and size of every other file
    dense.pt           the dense arch as TorchScript (loads without the project's model classes)
    tables/<t>.bin     uint8 rows of table t in fbgemm's row-wise layout (quantize.quantize_table)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protos.durable import fsync_dir
from protos.quantize import DenseQuantization, TableDType, quantize_table, row_bytes

FORMAT = "recsys-ps-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.pt"
OUT_OF_RANGE = ("error", "zero")


class PackageError(ValueError):
    """A package that is missing, corrupt or incompatible; the message says which file and why."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    num_rows: int
    dim: int
    dtype: TableDType
    pooling: str  # "sum" | "mean"
    file: str

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.dim, self.dtype)


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    table: str


@dataclass
class Package:
    """A verified package in memory: what a server builds its TBE and dense arch from."""

    path: Path
    manifest: dict[str, Any]
    dense: torch.jit.ScriptModule
    tables: dict[str, TableSpec]
    features: list[FeatureSpec]
    rows: dict[str, torch.Tensor] = field(repr=False)  # table -> uint8 [num_rows, row_bytes]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def dense_features(self) -> int:
        return int(self.manifest["dense_features"])

    @property
    def out_of_range(self) -> str:
        return self.manifest["out_of_range"]

    @property
    def table_bytes(self) -> int:
        return sum(t.num_rows * t.row_bytes for t in self.tables.values())


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes | memoryview) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": _sha256(data), "bytes": len(memoryview(data).cast("B"))}


def script_dense(dense: torch.nn.Module, quantization: DenseQuantization) -> torch.jit.ScriptModule:
    """TorchScript of the dense arch (after dynamic int8 quantization of its Linear layers if asked)."""
    import copy

    module = copy.deepcopy(dense).eval()
    if quantization is DenseQuantization.INT8:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            module = torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


def write_package(out: str | Path, *, name: str, version: int, dense: torch.nn.Module, dense_features: int,
                  features: list[FeatureSpec], tables: dict[str, torch.Tensor], table_dims: dict[str, int],
                  table_dtypes: dict[str, TableDType], pooling: dict[str, str],
                  dense_quantization: DenseQuantization = DenseQuantization.NONE, out_of_range: str = "error",
                  source: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Quantizes the float tables, scripts the dense arch and writes the package atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise PackageError(f"{out}: exists (pass overwrite=True / --force to replace it)")
    if out_of_range not in OUT_OF_RANGE:
        raise PackageError(f"out_of_range: {out_of_range!r} is not one of {OUT_OF_RANGE}")
    if version < 1:
        raise PackageError(f"version: must be >= 1, got {version}")
    for f in features:
        if f.table not in tables:
            raise PackageError(f"feature {f.name!r}: table {f.table!r} has no weights")
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        files: dict[str, Any] = {}
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(script_dense(dense, dense_quantization), buf)
        files[DENSE_FILE] = _write(tmp / DENSE_FILE, buf.getvalue())
        specs = []
        for tname, weights in tables.items():
            dtype = table_dtypes[tname]
            rows = quantize_table(weights, dtype)
            rel = f"tables/{tname}.bin"
            files[rel] = _write(tmp / rel, memoryview(rows.numpy()).cast("B"))
            specs.append({"name": tname, "num_rows": int(weights.shape[0]), "dim": table_dims[tname],
                          "dtype": dtype.value, "pooling": pooling[tname], "file": rel, "row_bytes": int(rows.shape[1]),
                          "float32_bytes": int(weights.shape[0]) * table_dims[tname] * 4})
        fsync_dir(tmp / "tables")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "version": version,
            "torch": torch.__version__.split("+")[0],
            "dense_features": dense_features,
            "features": [{"name": f.name, "table": f.table} for f in features],
            "tables": specs,
            "dense": {"file": DENSE_FILE, "format": "torchscript", "quantization": dense_quantization.value},
            "out_of_range": out_of_range,
            # TorchRec's BatchingMetadata per model input: how a batching server may merge and place it
            "batching": {"float_features": {"type": "dense", "device": "cpu", "pinned": []},
                         "id_list_features": {"type": "sparse", "device": "cpu", "pinned": []}},
            "source": source or {},
            "files": files,
        }
        _write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        fsync_dir(out.parent.resolve())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _read_verified(root: Path, rel: str, entry: dict[str, Any]) -> bytes:
    path = root / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{path}: missing (named in {MANIFEST})") from None
    if len(data) != entry.get("bytes"):
        raise PackageError(f"{path}: {len(data)} bytes, {MANIFEST} says {entry.get('bytes')} (truncated?)")
    if _sha256(data) != entry.get("sha256"):
        raise PackageError(f"{path}: sha256 mismatch (corrupt)")
    return data


def read_manifest(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    if not root.is_dir():
        raise PackageError(f"{root}: not a package directory")
    try:
        manifest = json.loads((root / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise PackageError(f"{root}: no {MANIFEST} (not a package, or an incomplete one)") from None
    except ValueError as e:
        raise PackageError(f"{root / MANIFEST}: corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{root / MANIFEST}: format is not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{root / MANIFEST}: format_version {manifest.get('format_version')!r}; this loader "
                           f"reads {FORMAT_VERSION}")
    return manifest


def load_package(path: str | Path, read_tables: bool = True) -> Package:
    """Reads and verifies every file before anything is built from it; refuses with the reason.

    read_tables=False: a worker that maps the supervisor's table image (shared_tables) skips reading
    and hashing the table files (the supervisor verified them when it wrote the image)."""
    root = Path(path)
    m = read_manifest(root)
    try:
        files: dict[str, Any] = m["files"]
        tables: dict[str, TableSpec] = {}
        for t in m["tables"]:
            spec = TableSpec(t["name"], int(t["num_rows"]), int(t["dim"]), TableDType.parse(t["dtype"], "dtype"),
                             t["pooling"], t["file"])
            if spec.pooling not in ("sum", "mean"):
                raise PackageError(f"table {spec.name!r}: pooling {spec.pooling!r} is not sum or mean")
            tables[spec.name] = spec
        features = [FeatureSpec(f["name"], f["table"]) for f in m["features"]]
        dense_file = m["dense"]["file"]
        int(m["dense_features"]), int(m["version"]), str(m["name"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, PackageError):
            raise
        raise PackageError(f"{root / MANIFEST}: incompatible ({type(e).__name__}: {e})") from None
    if m.get("out_of_range") not in OUT_OF_RANGE:
        raise PackageError(f"{root / MANIFEST}: out_of_range {m.get('out_of_range')!r} is not one of {OUT_OF_RANGE}")
    for f in features:
        if f.table not in tables:
            raise PackageError(f"{root / MANIFEST}: feature {f.name!r} names unknown table {f.table!r}")
    if len({t.pooling for t in tables.values()}) > 1:
        raise PackageError(f"{root / MANIFEST}: mixed pooling modes are not served (one TBE, one pooling)")
    named = {dense_file, *(t.file for t in tables.values())}
    if not named <= set(files):
        raise PackageError(f"{root / MANIFEST}: no checksum for {sorted(named - set(files))}")
    rows: dict[str, torch.Tensor] = {}
    for spec in tables.values() if read_tables else ():
        data = _read_verified(root, spec.file, files[spec.file])
        if len(data) != spec.num_rows * spec.row_bytes:
            raise PackageError(f"{root / spec.file}: {len(data)} bytes do not hold {spec.num_rows} rows of "
                               f"{spec.row_bytes} bytes (table {spec.name!r}, {spec.dtype.value}, dim {spec.dim})")
        rows[spec.name] = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(spec.num_rows, spec.row_bytes)
    dense_bytes = _read_verified(root, dense_file, files[dense_file])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what the package carries
            dense = torch.jit.load(io.BytesIO(dense_bytes), map_location="cpu")
    except Exception as e:  # a TorchScript archive this torch cannot read
        raise PackageError(f"{root / dense_file}: TorchScript does not load ({type(e).__name__}: {e})") from None
    return Package(root, m, dense.eval(), tables, features, rows)
