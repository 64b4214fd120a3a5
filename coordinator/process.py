"""Starts a coordinator as a child process and waits for its announced port (tests, demo, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from embedding_service.process import start_announced


@dataclass
class CoordinatorProcess:
    proc: subprocess.Popen
    announced: dict
    workdir: Path
    token: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.announced['port']}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return (self.workdir / "stderr.log").read_text()[-chars:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def launch(args: list[str] | None = None, *, workdir: str | Path | None = None, token: str = "test-admin-token",
           timeout: float = 60.0) -> CoordinatorProcess:
    wd = Path(workdir or tempfile.mkdtemp(prefix="coordinator-"))
    wd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RECSYS_ADMIN_TOKEN=token)
    proc, msg = start_announced(["coordinator.cli", "serve", "--data-dir", str(wd / "redis"), *(args or [])], wd,
                                what="coordinator", timeout=timeout, env=env)
    return CoordinatorProcess(proc, msg, wd, token)
