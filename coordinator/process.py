"""Starts a coordinator as a child process and waits for its announced port (tests, demo, benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


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
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["RECSYS_ADMIN_TOKEN"] = token
    out_path, err_path = wd / "stdout.log", wd / "stderr.log"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--data-dir", str(wd / "redis"),
                                 *(args or [])], stdout=out, stderr=err, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out_path.read_text().splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "serving":
                return CoordinatorProcess(proc, msg, wd, token)
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited with code {proc.returncode}: {err_path.read_text()[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"coordinator did not announce its port within {timeout}s: {err_path.read_text()[-4000:]}")
