"""One read-only copy of a package's tables for every worker process: the TBE's host buffer as a file.

fbgemm's IntNBit TBE reads every table from one uint8 host buffer (tables at aligned offsets). The
supervisor writes that buffer once per package as an image file (atomically, named by the manifest's
checksum and the buffer size); each worker maps it read-only and shared instead of allocating and
filling its own, so the page cache holds the only copy of the table bytes and N workers cost one copy
plus N interpreters.

Online freshness (serve-triton --follow) maps one version's private copy writable in one follower
process; see image_state.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import warnings
from pathlib import Path

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

from protos.durable import fsync_dir
from protos.package import MANIFEST, Package, PackageError, load_package

IMAGE_SUFFIX = ".tbe"


def build_tbe(package: Package, device: torch.device) -> IntNBitTableBatchedEmbeddingBagsCodegen:
    """The package's one TBE, weights not yet allocated (initialize_weights or map_image does that)."""
    tables = list(package.tables.values())
    position = {t.name: i for i, t in enumerate(tables)}
    loc = EmbeddingLocation.DEVICE if device.type == "cuda" else EmbeddingLocation.HOST
    pooling = PoolingMode.MEAN if tables[0].pooling == "mean" else PoolingMode.SUM
    return IntNBitTableBatchedEmbeddingBagsCodegen(
        [(t.name, t.num_rows, t.dim, t.dtype.sparse_type, loc) for t in tables],
        feature_table_map=[position[f.table] for f in package.features],
        pooling_mode=pooling, device=device, output_dtype=SparseType.FP32,
        bounds_check_mode=BoundsCheckMode.NONE)  # ids are checked per request before they get here


def image_path(cache_dir: str | Path, package: Package, host_size: int) -> Path:
    """Named by the manifest (which holds every table's sha256) and the layout's size: a package
    rewritten in place, or a fbgemm with another layout, gets a new image instead of a stale one."""
    digest = hashlib.sha256((package.path / MANIFEST).read_bytes()).hexdigest()[:24]
    return Path(cache_dir) / f"{package.name}-v{package.version}-{digest}-{host_size}{IMAGE_SUFFIX}"


def write_image(package: Package, cache_dir: str | Path) -> Path:
    """The TBE host buffer of a verified, fully read package, written once (tmp + rename)."""
    if not package.rows:
        raise PackageError(f"{package.path}: tables were not read; an image needs them")
    tbe = build_tbe(package, torch.device("cpu"))
    out = image_path(cache_dir, package, tbe.host_size)
    if out.exists() and out.stat().st_size == tbe.host_size:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.truncate(tbe.host_size)  # alignment gaps stay zero
            for t, offset in zip(package.tables.values(), tbe.weights_physical_offsets, strict=True):
                f.seek(offset)
                f.write(memoryview(package.rows[t.name].numpy()).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def map_image(tbe: IntNBitTableBatchedEmbeddingBagsCodegen, path: str | Path, writable: bool = False) -> mmap.mmap:
    """Points the TBE's host buffer at the image, mapped shared (pages populated now, so the first requests
    do not fault them in); read-only unless `writable` (the one follower process of a followed image).
    Keep the returned map alive as long as the TBE."""
    if tbe.weight_initialized or tbe.dev_size or tbe.uvm_size:
        raise ValueError("map_image: a CPU TBE whose weights are not allocated yet")
    with open(path, "r+b" if writable else "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != tbe.host_size:
            raise PackageError(f"{path}: {size} bytes, the TBE's host buffer is {tbe.host_size} "
                               "(an image of another package or fbgemm layout)")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mapped = mmap.mmap(f.fileno(), size, flags=flags, prot=prot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": the TBE only reads it
        weights = torch.frombuffer(mapped, dtype=torch.uint8)
    # what _apply_split does, without allocating a private buffer
    tbe.weight_initialized = True
    tbe.initialize_logical_weights_placements_and_offsets()
    tbe.weights_host = weights
    return mapped


def prepare(path: str | Path, cache_dir: str | Path, name: str = "", version: int = 0) -> dict:
    """Verifies the package, writes its image; what a supervisor needs to serve it, as JSON-able data."""
    pkg = load_package(path)
    if name:
        pkg.manifest["name"] = name
    if version:
        pkg.manifest["version"] = version
    image = write_image(pkg, cache_dir)
    return {**serving_facts(pkg), "path": str(Path(path).resolve()), "image": str(image)}


def serving_facts(pkg: Package) -> dict:
    """What a frontend without the model needs to list a package and validate its requests (the Predict
    proxy: requests.validate with a predict_proxy.ModelSpec)."""
    return {"name": pkg.name, "version": pkg.version, "features": [f.name for f in pkg.features],
            "dense_features": pkg.dense_features,
            "rows_per_feature": [pkg.tables[f.table].num_rows for f in pkg.features],
            "out_of_range": pkg.out_of_range,
            "table_dtypes": {t.name: t.dtype.value for t in pkg.tables.values()}, "table_bytes": pkg.table_bytes,
            "dense_quantization": pkg.manifest["dense"]["quantization"]}


def main(argv: list[str] | None = None) -> int:
    """`python -m inference_gateway.shared_tables PACKAGE CACHE_DIR [NAME] [VERSION]`: one JSON line, the
    package's serving facts or {"error", "kind"}. A supervisor runs this as a short-lived child so that
    torch and the package's bytes never stay in its own memory."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    try:
        info = prepare(args[0], args[1], args[2] if len(args) > 2 else "", int(args[3]) if len(args) > 3 else 0)
    except PackageError as e:
        print(json.dumps({"error": str(e), "kind": "package"}), flush=True)
        return 2
    except OSError as e:
        print(json.dumps({"error": str(e), "kind": "os", "errno": e.errno}), flush=True)
        return 2
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
