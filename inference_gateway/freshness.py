"""Wires a delta follower to the gateway's registry: which model it writes into, and how it resynchronises
(loads the newest snapshot package, makes it the default, drains and unloads the one it replaces)."""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from inference_gateway.follower import DeltaFollower, FollowSettings
from inference_gateway.model import ServingModel
from inference_gateway.registry import ModelRegistry
from protos.package import PackageError, read_manifest

log = logging.getLogger(__name__)


def snapshot_step(path: Path) -> int:
    """The training step a package was exported at (-1 when it does not say)."""
    return int(read_manifest(path).get("source", {}).get("step", -1))


def newest_snapshot(directory: Path) -> Path | None:
    """The package under `directory` exported at the latest step (unreadable ones are skipped)."""
    best: tuple[int, Path] | None = None
    for child in sorted(directory.iterdir()) if directory.is_dir() else []:
        try:
            step = snapshot_step(child)
        except PackageError:
            continue
        if best is None or step > best[0]:
            best = (step, child)
    return best[1] if best else None


class Freshness:
    """Follows the deltas into the default version of `model_name` (default: the first model loaded)."""

    def __init__(self, settings: FollowSettings, registry: ModelRegistry, metrics: CollectorRegistry,
                 snapshots: str | None = None, model_name: str = "", drain_s: float = 10.0) -> None:
        self.registry, self.snapshots, self.drain_s = registry, Path(snapshots) if snapshots else None, drain_s
        self.name = model_name or registry.resolve("", 0).model.name
        self.follower = DeltaFollower(settings, self.model, self.resync, metrics)

    def model(self) -> ServingModel:
        return self.registry.resolve(self.name, 0).model

    def resync(self) -> ServingModel | None:
        if self.snapshots is None:
            return None
        path = newest_snapshot(self.snapshots)
        current = self.registry.resolve(self.name, 0)
        if path is None or snapshot_step(path) <= DeltaFollower._base_of(current.model):
            return None
        version = max(i.version for i in self.registry.infos() if i.name == self.name) + 1
        loaded = self.registry.load(path, name=self.name, version=version, make_default=True)
        old = self.registry.unload(self.name, current.model.version)
        old.batcher.close(self.drain_s)  # requests already queued on it are answered first
        log.info("freshness: resynchronised %s from %s (step %d) as version %d", self.name, path,
                 snapshot_step(path), version)
        return loaded.model

    def start(self) -> Freshness:
        self.follower.start()
        return self

    def close(self) -> None:
        self.follower.close()
