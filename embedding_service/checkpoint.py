"""Checkpoints of a shard's weights and optimizer state: atomic, checksummed, verified on restore.

Layout of a checkpoint directory: data files named `<step>-<token>-slice<i>.<kind>.bin` (raw
little-endian float32) and `manifest.json`. The manifest is the commit point: it is written to a temp
file, fsynced and renamed over the old one after every data file it names is durable, so a reader
sees either the old checkpoint or the new one, never a mix. Files the new manifest does not name are
removed afterwards.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from embedding_service.errors import ShardError, data_loss, precondition
from embedding_service.tables import ShardTables, SliceState
from protos.shard_checkpoint import (
    MANIFEST,
    CheckpointFormatError,
    Problem,
    file_entry,
    read_array,
    read_manifest,
    write_manifest,
)


def _slice_entry(sl: SliceState) -> dict:
    s = sl.slice
    return {"index": sl.index, "table": s.table, "row_offset": s.row_offset, "num_rows": s.num_rows,
            "col_offset": s.col_offset, "num_cols": s.num_cols, "optimizer": sl.optimizer_name}


def _tensors(sl: SliceState) -> list[tuple[str, torch.Tensor]]:
    return [("weights", sl.weights)] + [(f"state{k}", t) for k, t in enumerate(sl.states)]


@dataclass
class CheckpointResult:
    manifest_path: Path
    bytes_written: int


def _missing_dirs(root: Path) -> list[Path]:
    """The directories `root.mkdir(parents=True)` would create, deepest first."""
    out, p = [], root
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def save(tables: ShardTables, directory: str | Path, *, shard_id: int, plan_version: int,
         step: int) -> CheckpointResult:
    """Writes the checkpoint; on any failure (a full disk, a file where a directory is expected) removes
    every file and directory it created, so the previous checkpoint in `directory` stays the valid one."""
    root = Path(directory)
    created = _missing_dirs(root)
    token = secrets.token_hex(4)
    committed = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        entries, written = [], 0
        for sl in tables.slices:
            entry = _slice_entry(sl)
            entry["files"] = []
            for kind, t in _tensors(sl):
                arr = t.detach().cpu().contiguous().numpy()
                name = f"{step}-{token}-slice{sl.index}.{kind}.bin"
                with open(root / name, "wb") as f:
                    f.write(memoryview(arr).cast("B"))
                    f.flush()
                    os.fsync(f.fileno())
                entry["files"].append(file_entry(name, kind, arr))
                written += arr.nbytes
            entries.append(entry)
        written += write_manifest(root, shard_id=shard_id, plan_version=plan_version, step=step, slices=entries)
        committed = True
    finally:
        if not committed:
            _undo(root, token, created)
    keep = {f["name"] for e in entries for f in e["files"]} | {MANIFEST}
    for p in root.iterdir():
        if p.name not in keep and p.name.endswith(".bin"):
            p.unlink(missing_ok=True)
    return CheckpointResult(root / MANIFEST, written)


def _undo(root: Path, token: str, created: list[Path]) -> None:
    """Removes the data files of the failed save `token` and the directories it created (best effort)."""
    if root.is_dir():
        for p in root.glob(f"*-{token}-slice*.bin"):
            p.unlink(missing_ok=True)
    for d in created:
        try:
            d.rmdir()
        except OSError:
            break


@dataclass
class LoadedCheckpoint:
    step: int
    bytes_read: int
    tensors: dict[int, list[torch.Tensor]]  # slice index -> [weights, state0, ...]


def _status(e: CheckpointFormatError) -> ShardError:
    """A directory without a checkpoint is the caller's mistake; a damaged one is lost data."""
    if e.problem == Problem.NO_MANIFEST:
        return precondition(f"directory: {e}")
    return data_loss(str(e))


def load_verified(tables: ShardTables, directory: str | Path) -> LoadedCheckpoint:
    """Reads and verifies everything before any live tensor is touched."""
    root = Path(directory)
    try:
        manifest = read_manifest(root)
    except CheckpointFormatError as e:
        raise _status(e) from None
    entries = manifest["slices"]
    if len(entries) != len(tables.slices):
        raise precondition(f"checkpoint holds {len(entries)} slices, this shard {len(tables.slices)}")
    loaded: dict[int, list[torch.Tensor]] = {}
    read = 0
    for sl, entry in zip(tables.slices, entries, strict=True):
        want = _slice_entry(sl)
        got = {k: entry.get(k) for k in want}
        if got != want:
            raise precondition(f"slice {sl.index} (table {sl.slice.table!r}): checkpoint has {got}, shard has {want}")
        live = _tensors(sl)
        files = entry.get("files", [])
        if [f.get("kind") for f in files] != [k for k, _ in live]:
            raise data_loss(f"slice {sl.index} (table {sl.slice.table!r}): files {[f.get('kind') for f in files]} "
                            f"do not match {[k for k, _ in live]}")
        out = []
        for f, (kind, t) in zip(files, live, strict=True):
            if list(f["shape"]) != list(t.shape) or f["dtype"] != str(t.detach().cpu().numpy().dtype):
                raise precondition(f"{f['name']}: {f['dtype']} {f['shape']} does not fit {kind} of table "
                                   f"{sl.slice.table!r} {list(t.shape)}")
            try:
                arr = read_array(root, f, f"table {sl.slice.table!r} {kind}")
            except CheckpointFormatError as e:
                raise _status(e) from None
            out.append(torch.from_numpy(arr))
            read += arr.nbytes
        loaded[sl.index] = out
    return LoadedCheckpoint(step=int(manifest["step"]), bytes_read=read, tensors=loaded)


def apply(tables: ShardTables, ckpt: LoadedCheckpoint) -> None:
    with torch.no_grad():
        for sl in tables.slices:
            for (_, live), new in zip(_tensors(sl), ckpt.tensors[sl.index], strict=True):
                live.copy_(new)
