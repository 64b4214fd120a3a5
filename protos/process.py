"""Runs a server of the project as a child process and reads its announce line.

Every server (shard, coordinator, gateway) prints one JSON line `{"event": "serving", "port": ...,
"metrics_port": ...}` once it listens; launchers (tests, the demo, benchmarks, the coordinator's
local recovery) start it with `python -m MODULE ARGS` and wait for that line instead of guessing ports.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent  # the repository: children import the same code


def exit_now(code: int = 0) -> NoReturn:
    """How a server or a distributed trainer leaves once everything is drained and written: output flushed,
    logging shut down, then out without the interpreter's teardown, whose join of idle gRPC / OpenMP threads
    can block exit and whose finalization beside gloo's threads can abort it ("terminate called without an
    active exception", SIGABRT after a complete run)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for peers that must know it before binding, e.g. MASTER_PORT)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the repository first on PYTHONPATH."""
    out = dict(os.environ if env is None else env)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    return out


@dataclass
class ServerProcess:
    """A server of the project running as a child process, as announced."""

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


def stop_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM to every live child at once, then up to `timeout` s each to exit; SIGKILL (and reap) the rest."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def start_announced(args: list[str], workdir: Path, *, what: str, timeout: float,
                    env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """Runs `python -m ARGS` with the repository on PYTHONPATH (stdout and stderr to files in `workdir`)
    and waits for its `{"event": "serving"}` line; a child that exits or stays silent is an error
    carrying the tail of its log."""
    out_path, err_path = workdir / "stdout.log", workdir / "stderr.log"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=err, env=child_env(env))
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


def workdir_for(workdir: str | Path | None, prefix: str) -> Path:
    """`workdir` (created), or a new temporary directory named after the server."""
    wd = Path(workdir or tempfile.mkdtemp(prefix=prefix))
    wd.mkdir(parents=True, exist_ok=True)
    return wd


def launch_with_config(module: str, config: dict, *, what: str, workdir: str | Path | None = None,
                       extra_args: list[str] | None = None, timeout: float = 180.0,
                       env: dict[str, str] | None = None) -> ServerProcess:
    """`python -m MODULE serve --config FILE` with `config` written to FILE (JSON) in the workdir."""
    wd = workdir_for(workdir, f"{what}-")
    path = wd / f"{what}.json"
    path.write_text(json.dumps(config))
    proc, msg = start_announced([module, "serve", "--config", str(path), *(extra_args or [])], wd, what=what,
                                timeout=timeout, env=env)
    return ServerProcess(proc, msg, wd)
