"""Loaded model versions by name, each model's default version and the default model, with serve's
statuses for what a request or a management call names. Apart from what a version is (serve's
LoadedModel, serve-native's prepared Version or worker ServingModel), so every gateway applies the same
rules, and without torch, so serve-native's supervisor stays small."""

from __future__ import annotations

from typing import Generic, TypeVar

import grpc

from inference_gateway.requests import RequestError

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
