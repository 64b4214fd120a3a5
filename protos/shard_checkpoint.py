"""The on-disk format of one shard's checkpoint, shared by its writer (the shard) and its readers
(the shard's restore, the trainer's export).

A directory holds data files (raw little-endian arrays, one per slice and kind: weights, state0, ...)
and `manifest.json`: format version, shard id, plan version, step, and per slice its table, offsets,
optimizer and files (name, kind, dtype, shape, bytes, sha256). The manifest is written last, atomically,
so it is the commit point. Readers go through `read_manifest` and `read_array`, so the format version,
sizes and checksums are checked the same way everywhere.
"""

from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from protos.durable import fsync_dir, write_file_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class Problem(enum.Enum):
    NO_MANIFEST = "no manifest"
    CORRUPT_MANIFEST = "corrupt manifest"
    FORMAT = "format version"
    MISSING_FILE = "missing file"
    SIZE = "size mismatch"
    CHECKSUM = "sha256 mismatch"


class CheckpointFormatError(ValueError):
    """A checkpoint that cannot be read; `problem` says what, the message names the file and table."""

    def __init__(self, problem: Problem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


def file_entry(name: str, kind: str, arr: np.ndarray) -> dict[str, Any]:
    """The manifest entry of a data file holding `arr` (checksummed from the array itself)."""
    return {"name": name, "kind": kind, "dtype": str(arr.dtype), "shape": list(arr.shape), "bytes": arr.nbytes,
            "sha256": hashlib.sha256(memoryview(arr).cast("B")).hexdigest()}


def write_manifest(root: Path, *, shard_id: int, plan_version: int, step: int, slices: list[dict]) -> int:
    """Commits the checkpoint: the manifest atomically, then the directory; returns its size."""
    manifest = {"format_version": FORMAT_VERSION, "shard_id": shard_id, "plan_version": plan_version,
                "step": step, "slices": slices}
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    write_file_atomic(root / MANIFEST, body)
    fsync_dir(root)
    return len(body)


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the checkpoint in `root`, with its format version, step and slices checked."""
    path = root / MANIFEST
    if not path.exists():
        raise CheckpointFormatError(Problem.NO_MANIFEST, f"no {MANIFEST} in {root}")
    try:
        manifest = json.loads(path.read_bytes())
        int(manifest["step"])
        list(manifest["slices"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(Problem.CORRUPT_MANIFEST, f"{path}: corrupt manifest ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointFormatError(Problem.FORMAT, f"{path}: format_version {manifest.get('format_version')} "
                                                    f"!= {FORMAT_VERSION}")
    return manifest


def read_array(root: Path, entry: dict[str, Any], what: str) -> np.ndarray:
    """The verified contents of one data file (size and sha256 against its manifest entry), shaped and
    typed as the entry says; `what` names it in errors (e.g. "table 'users' weights")."""
    path = root / entry["name"]
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise CheckpointFormatError(Problem.MISSING_FILE, f"{path.name}: missing ({what})") from None
    if raw.nbytes != entry["bytes"]:
        raise CheckpointFormatError(Problem.SIZE, f"{path.name}: {raw.nbytes} bytes, manifest says {entry['bytes']} "
                                                  f"({what}; truncated?)")
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise CheckpointFormatError(Problem.CHECKSUM, f"{path.name}: sha256 mismatch ({what}; corrupt)")
    return raw.view(np.dtype(entry["dtype"])).reshape(entry["shape"])
