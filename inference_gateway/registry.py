"""Loaded model versions, the default version of each model, and hot swap without failed requests.

A request resolves its model version once, on arrival, and holds that version's batcher; swapping
the default only changes what later requests resolve to. Unloading removes a version from resolution
first and then lets its batcher finish every request already queued, so no request fails in a swap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


class ModelRegistry:
    def __init__(self, batching: BatchingConfig, deliver: Deliver, device: str = "cpu",
                 make_batcher: Callable[[ServingModel], Batcher] | None = None) -> None:
        self.batching, self.deliver, self.device = batching, deliver, device
        self.make_batcher = make_batcher or (lambda m: Batcher(m, batching, deliver))
        self._lock = threading.Lock()  # guards the maps below (loads run off the event loop)
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._default: dict[str, int] = {}
        self._default_model: str | None = None

    def __len__(self) -> int:
        return sum(len(v) for v in self._models.values())

    def resolve(self, name: str, version: int) -> LoadedModel:
        """The version a request runs on (NOT_FOUND names what is missing)."""
        name = name or self._default_model or ""
        versions = self._models.get(name)
        if not versions:
            if not name:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "model: no model is loaded")
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model: {name!r} is not loaded "
                                                          f"(loaded: {sorted(self._models)})")
        v = version or self._default[name]
        loaded = versions.get(v)
        if loaded is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"version: model {name!r} has no version {v} "
                                                          f"(loaded: {sorted(versions)})")
        return loaded

    def load(self, path: str | Path, name: str = "", version: int = 0, make_default: bool = False) -> LoadedModel:
        """Reads, verifies and builds the package (slow; call off the event loop), then publishes it."""
        pkg = load_package(path)  # PackageError names the file and reason
        if name:
            pkg.manifest["name"] = name
        if version:
            pkg.manifest["version"] = version
        with self._lock:
            if pkg.version in self._models.get(pkg.name, {}):
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"version: model {pkg.name!r} version {pkg.version} is already loaded")
        model = ServingModel(pkg, device=self.device)
        model.warm_up()  # before it takes requests
        loaded = LoadedModel(model, self.make_batcher(model), Path(path))
        with self._lock:
            if pkg.version in self._models.get(pkg.name, {}):  # lost a race with a concurrent load
                loaded.batcher.close()
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"version: model {pkg.name!r} version {pkg.version} is already loaded")
            versions = dict(self._models.get(pkg.name, {}))
            versions[pkg.version] = loaded
            self._models = {**self._models, pkg.name: versions}  # copy-on-write: readers never lock
            if make_default or pkg.name not in self._default:
                self._default[pkg.name] = pkg.version
            if self._default_model is None:
                self._default_model = pkg.name
        return loaded

    def set_default(self, name: str, version: int) -> LoadedModel:
        with self._lock:
            loaded = self.resolve(name, version)
            if not version:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "version: must be >= 1")
            self._default[loaded.model.name] = version
            return loaded

    def unload(self, name: str, version: int) -> LoadedModel:
        """Removes the version from resolution; the caller then drains its batcher (`batcher.close()`)."""
        with self._lock:
            if not name:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "name: required")
            if not version:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "version: required (>= 1)")
            loaded = self.resolve(name, version)
            versions = dict(self._models[name])
            if self._default[name] == version and len(versions) > 1:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"version: {version} is the default of {name!r}; SetDefaultVersion to another "
                                   "first")
            del versions[version]
            models = dict(self._models)
            if versions:
                models[name] = versions
            else:
                del models[name]
                del self._default[name]
                if self._default_model == name:
                    self._default_model = next(iter(models), None)
            self._models = models
            return loaded

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def infos(self) -> list[inference_pb2.ModelInfo]:
        return [lm.info(self._default.get(name) == v) for name, versions in sorted(self._models.items())
                for v, lm in sorted(versions.items())]

    def all_loaded(self) -> list[LoadedModel]:
        return [lm for versions in self._models.values() for lm in versions.values()]

    def queued_samples(self) -> int:
        return sum(lm.batcher.queued_samples for lm in self.all_loaded())
