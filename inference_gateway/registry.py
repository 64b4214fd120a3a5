"""Loaded model versions, the default version of each model, and hot swap without failed requests.

A request resolves its model version once, on arrival, and holds that version's batcher; swapping
the default only changes what later requests resolve to. Unloading removes a version from resolution
first and then lets its batcher finish every request already queued, so no request fails in a swap.

The rules themselves (which version a request runs on, which loads and unloads are refused and how)
are versions.VersionTable's, which serve-native's supervisor and workers apply too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inference_gateway.batching import Batcher, BatchingConfig, Deliver
from inference_gateway.model import ServingModel
from inference_gateway.requests import RequestError
from inference_gateway.versions import VersionTable
from protos import inference_pb2
from protos.package import load_package


@dataclass
class LoadedModel:
    model: ServingModel
    batcher: Batcher
    path: Path

    def info(self, is_default: bool) -> inference_pb2.ModelInfo:
        m, pkg = self.model, self.model.package
        return inference_pb2.ModelInfo(
            name=m.name, version=m.version, is_default=is_default, path=str(self.path), features=m.features,
            dense_features=m.dense_features, table_dtypes={t.name: t.dtype.value for t in pkg.tables.values()},
            table_bytes=m.table_bytes, dense_quantization=pkg.manifest["dense"]["quantization"],
            applied_steps=m.applied_steps)


class ModelRegistry:
    def __init__(self, batching: BatchingConfig, deliver: Deliver, device: str = "cpu",
                 make_batcher: Callable[[ServingModel], Batcher] | None = None) -> None:
        self.batching, self.deliver, self.device = batching, deliver, device
        self.make_batcher = make_batcher or (lambda m: Batcher(m, batching, deliver))
        self._lock = threading.Lock()  # serializes loads and unloads (run off the event loop)
        self._table: VersionTable[LoadedModel] = VersionTable()

    def __len__(self) -> int:
        return len(self._table)

    def resolve(self, name: str, version: int) -> LoadedModel:
        """The version a request runs on (NOT_FOUND names what is missing)."""
        return self._table.resolve(name, version)

    def load(self, path: str | Path, name: str = "", version: int = 0, make_default: bool = False) -> LoadedModel:
        """Reads, verifies and builds the package (slow; call off the event loop), then publishes it."""
        pkg = load_package(path)  # PackageError names the file and reason
        if name:
            pkg.manifest["name"] = name
        if version:
            pkg.manifest["version"] = version
        with self._lock:
            self._table.check_new(pkg.name, pkg.version)
        model = ServingModel(pkg, device=self.device)
        model.warm_up()  # before it takes requests
        loaded = LoadedModel(model, self.make_batcher(model), Path(path))
        with self._lock:
            try:
                self._table.add(pkg.name, pkg.version, loaded, make_default)
            except RequestError:  # lost a race with a concurrent load
                loaded.batcher.close()
                raise
        return loaded

    def set_default(self, name: str, version: int) -> LoadedModel:
        with self._lock:
            return self._table.set_default(name, version)

    def unload(self, name: str, version: int) -> LoadedModel:
        """Removes the version from resolution; the caller then drains its batcher (`batcher.close()`)."""
        with self._lock:
            return self._table.remove(name, version)

    def versions(self, name: str) -> list[int]:
        return sorted(self._table.models.get(name, {}))

    def infos(self) -> list[inference_pb2.ModelInfo]:
        return [lm.info(is_default) for lm, is_default in self._table.entries()]

    def all_loaded(self) -> list[LoadedModel]:
        return self._table.items()

    def queued_samples(self) -> int:
        return sum(lm.batcher.queued_samples for lm in self.all_loaded())
