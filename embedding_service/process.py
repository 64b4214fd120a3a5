"""Starts a shard server as a child process and waits for its announced port (tests, demo, benchmarks)."""

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
class ServerProcess:
    """A server of the project running as a child process (shard, coordinator, gateway), as announced."""

    proc: subprocess.Popen
    announced: dict
    workdir: Path

    @property
    def port(self) -> int:
        return int(self.announced["port"])

    @property
    def metrics_port(self) -> int | None:
        return self.announced.get("metrics_port")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "stderr.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the server drains in-flight RPCs and exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@dataclass
class ShardProcess(ServerProcess):
    config_path: Path


def start_announced(args: list[str], workdir: Path, *, what: str, timeout: float,
                    env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """Runs `python -m ARGS` with the repository on PYTHONPATH and waits for its `{"event": "serving"}`
    line on stdout (every server of the project announces its bound ports that way)."""
    out_path, err_path = workdir / "stdout.log", workdir / "stderr.log"
    root = Path(__file__).resolve().parent.parent
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), child_env.get("PYTHONPATH")]))
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=err, env=child_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out_path.read_text().splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "serving":
                return proc, msg
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}: {err_path.read_text()[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"{what} did not announce its port within {timeout}s: {err_path.read_text()[-4000:]}")


def launch(config: dict, *, workdir: str | Path | None = None, extra_args: list[str] | None = None,
           timeout: float = 180.0, env: dict[str, str] | None = None) -> ShardProcess:
    wd = Path(workdir or tempfile.mkdtemp(prefix="shard-"))
    wd.mkdir(parents=True, exist_ok=True)
    cfg = wd / "shard.json"
    cfg.write_text(json.dumps(config))
    proc, msg = start_announced(["embedding_service.cli", "serve", "--config", str(cfg), *(extra_args or [])], wd,
                                what="shard", timeout=timeout, env=env)
    return ShardProcess(proc, msg, wd, cfg)
