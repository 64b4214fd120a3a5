"""Starts a gateway as a child process and waits for its announced port (tests, demo, benchmarks)."""

from __future__ import annotations

import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from embedding_service.process import start_announced


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
    proc, msg = start_announced(["inference_gateway.cli", "serve", *args], wd, what="gateway", timeout=timeout,
                                env=env)
    return GatewayProcess(proc, int(msg["port"]), msg.get("metrics_port"), msg, wd)
