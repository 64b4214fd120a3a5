"""Starts a coordinator as a child process and waits for its announced port (tests, demo, benchmarks)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from embedding_service.process import ServerProcess, start_announced


@dataclass
class CoordinatorProcess(ServerProcess):
    token: str


def launch(args: list[str] | None = None, *, workdir: str | Path | None = None, token: str = "test-admin-token",
           timeout: float = 60.0) -> CoordinatorProcess:
    wd = Path(workdir or tempfile.mkdtemp(prefix="coordinator-"))
    wd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RECSYS_ADMIN_TOKEN=token)
    proc, msg = start_announced(["coordinator.cli", "serve", "--data-dir", str(wd / "redis"), *(args or [])], wd,
                                what="coordinator", timeout=timeout, env=env)
    return CoordinatorProcess(proc, msg, wd, token)
