"""Starts a gateway as a child process and waits for its announced port (tests, demo, benchmarks)."""

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
class GatewayProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    announced: dict
    workdir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "stderr.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the gateway drains and exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def launch(args: list[str], *, workdir: str | Path | None = None, timeout: float = 120.0,
           env: dict[str, str] | None = None) -> GatewayProcess:
    """`inference-gateway serve ARGS` (port 0 unless given) as a child; returns once it announced."""
    wd = Path(workdir or tempfile.mkdtemp(prefix="gateway-"))
    wd.mkdir(parents=True, exist_ok=True)
    out_path, err_path = wd / "stdout.log", wd / "stderr.log"
    root = Path(__file__).resolve().parent.parent
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), child_env.get("PYTHONPATH")]))
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "inference_gateway.cli", "serve", *args],
                                stdout=out, stderr=err, env=child_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out_path.read_text().splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "serving":
                return GatewayProcess(proc, int(msg["port"]), msg.get("metrics_port"), msg, wd)
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with code {proc.returncode}: {err_path.read_text()[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"gateway did not announce its port within {timeout}s: {err_path.read_text()[-4000:]}")
