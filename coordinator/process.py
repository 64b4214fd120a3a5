"""Starts a coordinator as a child process and waits for its announced port (tests, demo, benchmarks)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from protos.process import ServerProcess, start_announced, workdir_for


@dataclass
class CoordinatorProcess(ServerProcess):
    token: str


def launch(args: list[str] | None = None, *, workdir: str | Path | None = None, token: str = "test-admin-token",
           timeout: float = 60.0, env: Mapping[str, str] | None = None) -> CoordinatorProcess:
    """`env` adds to this process's environment (e.g. RECSYS_FAILPOINTS for one coordinator)."""
    wd = workdir_for(workdir, "coordinator-")
    env = dict(os.environ, **(env or {}), RECSYS_ADMIN_TOKEN=token)
    proc, msg = start_announced(["coordinator.cli", "serve", "--data-dir", str(wd / "redis"), *(args or [])], wd,
                                what="coordinator", timeout=timeout, env=env)
    return CoordinatorProcess(proc, msg, wd, token)
