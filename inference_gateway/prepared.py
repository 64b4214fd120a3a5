"""A package version prepared for worker processes, as the supervisors of serve-triton and serve-native
keep it: its table image written once by shared_tables in a short-lived child (so torch and the package's
bytes never stay in the supervisor), and the facts it reported (name, version, features, image, ...)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from protos import inference_pb2
from protos.paths import status_of_oserror

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # importing it loads package `inference`, which tritonclient's stubs also define
    from inference_gateway.predict_proxy import ModelSpec


class Refused(Exception):
    """A management request refused: the gRPC status and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Version:
    """What shared_tables.prepare reported for one loaded version (the supervisor holds no torch)."""

    facts: dict

    @property
    def name(self) -> str:
        return self.facts["name"]

    @property
    def version(self) -> int:
        return int(self.facts["version"])

    @property
    def image(self) -> Path:
        return Path(self.facts["image"])

    @cached_property
    def spec(self) -> ModelSpec:
        from inference_gateway.predict_proxy import ModelSpec

        return ModelSpec(self.facts)

    def info(self, is_default: bool) -> inference_pb2.ModelInfo:
        return self.spec.info(is_default)


def prepare(path: str | Path, cache: str | Path, name: str = "", version: int = 0,
            env: dict[str, str] | None = None, timeout_s: float = 600) -> Version:
    """Verifies the package and writes its table image (under `cache`) in a child process; Refused
    naming `path` when the package is refused or unreadable."""
    try:
        out = subprocess.run([sys.executable, "-m", "inference_gateway.shared_tables", str(path), str(cache),
                              name, str(version)], capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"path: preparing {path} took over {timeout_s:g} s") from None
    try:
        facts = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise Refused(grpc.StatusCode.INTERNAL, f"path: preparing {path} failed: {out.stderr[-2000:]}") from None
    if "error" in facts:
        if facts["kind"] == "os":
            refused = status_of_oserror(OSError(facts.get("errno"), facts["error"]), "path", str(path))
            raise Refused(refused.code, refused.message)
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"path: package refused: {facts['error']}")
    return Version(facts)


def remove_image(image: Path) -> bool:
    """Deletes a table image no version uses any more (workers still mapping it keep their pages); False,
    logged, when the file system refuses, so a failed clean-up never fails the change that asked for it."""
    try:
        image.unlink(missing_ok=True)
        return True
    except OSError as e:
        log.warning("could not delete the unused table image %s: %s", image, e)
        return False
