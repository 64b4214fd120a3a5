"""Loaded model versions, the default version of each model, and hot swap without failed requests.

A request resolves its model version once, on arrival, and holds that version's batcher; swapping
the default only changes what later requests resolve to. Unloading removes a version from resolution
first and then lets its batcher finish every request already queued, so no request fails in a swap.

`VersionTable` holds the rules (which version a request runs on, which loads and unloads are refused
and how) apart from what a version is, so serve-native's supervisor and workers apply the same ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import grpc

from inference_gateway.batching import Batcher, BatchingConfig, Deliver
from inference_gateway.model import ServingModel
from inference_gateway.package import load_package
from inference_gateway.requests import RequestError
from protos import inference_pb2


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


T = TypeVar("T")


class VersionTable(Generic[T]):
    """name -> version -> T, each model's default version and the default model (the first loaded),
    with serve's statuses. Copy-on-write: readers never lock; writers serialize themselves."""

    def __init__(self) -> None:
        self.models: dict[str, dict[int, T]] = {}
        self.defaults: dict[str, int] = {}
        self.default_model: str | None = None

    def __len__(self) -> int:
        return sum(len(v) for v in self.models.values())

    def resolve(self, name: str, version: int) -> T:
        """The version a request runs on (NOT_FOUND names what is missing)."""
        name = name or self.default_model or ""
        versions = self.models.get(name)
        if not versions:
            if not name:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "model: no model is loaded")
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model: {name!r} is not loaded "
                                                          f"(loaded: {sorted(self.models)})")
        v = version or self.defaults[name]
        found = versions.get(v)
        if found is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"version: model {name!r} has no version {v} "
                                                          f"(loaded: {sorted(versions)})")
        return found

    def check_new(self, name: str, version: int) -> None:
        if version in self.models.get(name, {}):
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                               f"version: model {name!r} version {version} is already loaded")

    def add(self, name: str, version: int, item: T, make_default: bool = False) -> None:
        self.check_new(name, version)
        self.models = {**self.models, name: {**self.models.get(name, {}), version: item}}
        if make_default or name not in self.defaults:
            self.defaults = {**self.defaults, name: version}
        if self.default_model is None:
            self.default_model = name

    def set_default(self, name: str, version: int) -> T:
        found = self.resolve(name, version)
        if not version:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "version: must be >= 1")
        self.defaults = {**self.defaults, name or self.default_model: version}
        return found

    def remove(self, name: str, version: int) -> T:
        """Removes the version from resolution; the default of a model with other versions stays."""
        if not name:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "name: required")
        if not version:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "version: required (>= 1)")
        found = self.resolve(name, version)
        versions = dict(self.models[name])
        if self.defaults[name] == version and len(versions) > 1:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"version: {version} is the default of {name!r}; SetDefaultVersion to another first")
        del versions[version]
        models = dict(self.models)
        if versions:
            models[name] = versions
        else:
            del models[name]
            self.defaults = {k: v for k, v in self.defaults.items() if k != name}
            if self.default_model == name:
                self.default_model = next(iter(models), None)
        self.models = models
        return found

    def entries(self) -> list[tuple[T, bool]]:
        """(item, is_default) by name, then version."""
        return [(item, self.defaults.get(name) == v) for name, versions in sorted(self.models.items())
                for v, item in sorted(versions.items())]

    def items(self) -> list[T]:
        return [item for versions in self.models.values() for item in versions.values()]


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
