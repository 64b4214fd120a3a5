"""Consistent checkpoints of a training job: dense state and every shard at the same step.

Layout: `<dir>/step-<s>/` holds `dense.pt` (dense model, data-parallel tables, optimizers),
`shard-<i>/` (each shard's own checkpoint, written by the shard) and `manifest.json` (step, data
position, plan version, sha256 of dense.pt and of every shard manifest). The step directory is built
under a temporary name and renamed into place; `<dir>/LATEST` (written atomically) names the newest
complete one. Restore verifies every checksum before it touches a shard or the model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from protos.durable import file_sha256, write_file_atomic
from trainer.train import ShardedTrainer

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; names the file."""


@dataclass
class Resumed:
    step: int  # the last step the checkpoint includes
    data_position: int  # batches consumed


def save(trainer: ShardedTrainer, root: str | Path, step: int, data_position: int) -> Path:
    """Call on rank 0 at a step boundary, after every trainer's update of `step` was applied. Shards are
    sent absolute paths (inside their --checkpoint-root, which must contain `root`). A shard that fails
    raises ShardCallFailed naming it (after the transport's retries); LATEST still names the last complete
    checkpoint."""
    root = Path(root).absolute()
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"model": trainer.replicated.state_dict(), "optimizer": trainer.optimizer.state_dict()},
               tmp / "dense.pt")
    shards = {}
    for i, client in enumerate(trainer.transport.clients):
        trainer.transport.call(i, f"checkpoint of step {step}",
                               lambda client=client, i=i: client.checkpoint(str(tmp / f"shard-{i}"), step=step))
        shards[str(i)] = file_sha256(tmp / f"shard-{i}" / "manifest.json")
    manifest = {"step": step, "data_position": data_position, "plan_version": trainer.router.plan.version,
                "num_shards": len(trainer.transport.clients), "dense_sha256": file_sha256(tmp / "dense.pt"),
                "shard_manifest_sha256": shards}
    write_file_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    write_file_atomic(root / "LATEST", final.name.encode())
    return final


def latest(root: str | Path) -> Path:
    root = Path(root)
    try:
        name = (root / "LATEST").read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{root}: no LATEST (no complete checkpoint)") from None
    return root / name


def restore(trainer: ShardedTrainer, path: str | Path) -> Resumed:
    """Verifies, then restores every shard (each verifies its files too) and the dense state."""
    path = Path(path).absolute()
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST}: unreadable ({e})") from None
    if manifest["plan_version"] != trainer.router.plan.version:
        raise CheckpointError(f"{path}: written under plan version {manifest['plan_version']}, "
                              f"the job runs {trainer.router.plan.version}")
    if file_sha256(path / "dense.pt") != manifest["dense_sha256"]:
        raise CheckpointError(f"{path / 'dense.pt'}: sha256 mismatch")
    for i, digest in manifest["shard_manifest_sha256"].items():
        if file_sha256(path / f"shard-{i}" / "manifest.json") != digest:
            raise CheckpointError(f"{path / f'shard-{i}' / 'manifest.json'}: sha256 mismatch")
    for i, client in enumerate(trainer.transport.clients):
        trainer.transport.call(i, f"restore from {path.name}",
                               lambda client=client, i=i: client.restore(str(path / f"shard-{i}")))
    return load_dense(trainer, path)


def load_dense(trainer: ShardedTrainer, path: str | Path) -> Resumed:
    """The dense part alone (trainers other than rank 0, once rank 0 restored the shards)."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    if file_sha256(path / "dense.pt") != manifest["dense_sha256"]:
        raise CheckpointError(f"{path / 'dense.pt'}: sha256 mismatch")
    state = torch.load(path / "dense.pt")
    trainer.replicated.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    return Resumed(manifest["step"], manifest["data_position"])
