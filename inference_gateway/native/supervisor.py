"""serve-native's supervisor: writes the package's table image once, runs the native frontend
(frontend.cc) and `--workers` Python workers (worker.py) as its children, replaces a worker that dies,
exports the frontend's counters on /metrics, and drains on SIGTERM.

Why a supervisor in Python: the frontend stays small (accept, batch, answer); what changes rarely
(starting, replacing, metrics) is here. Children get SIGTERM if the supervisor dies, even by SIGKILL
(PR_SET_PDEATHSIG), so nothing outlives it.

Prints `{"event": "serving", "port", "metrics_port", "frontend_pid", "worker_pids"}` once every worker
is connected; then one JSON line per replaced worker.
"""

from __future__ import annotations

import ctypes
import json
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inference_gateway.native.build import BuildError, build
from protos.metrics import serve_metrics
from protos.process import child_env, stop_all
from protos.security import TlsConfig

log = logging.getLogger(__name__)
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


@dataclass
class NativeConfig:
    model: str
    workers: int = 2
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0  # -1: none
    max_batch_requests: int = 256
    max_batch_bytes: int = 131072
    max_wait_ms: float = 0.5
    max_queue_wait_ms: float = 0.0
    request_cost_us: int = 70
    byte_cost_ns: int = 60
    grace_s: float = 10.0
    workdir: str = "native-gateway"
    table_cache: str | None = None
    predict_token_file: str | None = None  # Predict and ModelInfer need `authorization: Bearer <its token>`
    tls: TlsConfig | None = None
    start_timeout_s: float = 300.0

    def frontend_args(self, sock: Path) -> list[str]:
        return ["--addr", f"{self.host}:{self.port}", "--socket", str(sock),
                "--max-batch", str(self.max_batch_requests), "--max-batch-bytes", str(self.max_batch_bytes),
                "--max-delay-us", str(round(self.max_wait_ms * 1000)),
                "--max-queue-us", str(round(self.max_queue_wait_ms * 1000)),
                "--cost-us", str(self.request_cost_us), "--cost-ns-per-byte", str(self.byte_cost_ns),
                "--grace-ms", str(round(self.grace_s * 1000)), *self.credential_args()]

    def credential_args(self) -> list[str]:
        """File paths only: the frontend reads the token and the PEMs itself (never on its command line)."""
        out = ["--predict-token-file", self.predict_token_file] if self.predict_token_file else []
        if self.tls is not None:
            out += ["--tls-cert", self.tls.cert, "--tls-key", self.tls.key]
            if self.tls.client_ca:
                out += ["--tls-client-ca", self.tls.client_ca]
        return out


class StartError(RuntimeError):
    """The gateway could not start (the package, the build, or a child that exited first)."""


def image_of(package: str, cache: Path) -> Path:
    """The package's table image, from shared_tables' own short-lived child (as serve-triton's supervisor
    prepares one), so this process never holds the tables."""
    out = subprocess.run([sys.executable, "-m", "inference_gateway.shared_tables", package, str(cache)],
                         capture_output=True, text=True, check=False, env=child_env(None))
    lines = out.stdout.strip().splitlines()
    facts = json.loads(lines[-1]) if lines else {"error": out.stderr[-2000:] or f"exit code {out.returncode}"}
    if "error" in facts:
        raise StartError(f"--model {package}: {facts['error']}")
    return Path(facts["image"])


def _die_with_parent() -> None:
    """In each child: SIGTERM when this process dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class FrontendState:
    """What the frontend's stdout said last (its events and cumulative counters)."""

    stats: dict = field(default_factory=dict)
    workers: int = 0
    events: queue.Queue = field(default_factory=queue.Queue)

    def read(self, stream) -> None:
        for line in stream:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "stats":
                self.stats = msg
            else:
                if "workers" in msg:
                    self.workers = int(msg["workers"])
                self.events.put(msg)
        self.events.put({"event": "frontend_exited"})


class NativeCollector(Collector):
    """The frontend's counters and the supervisor's, in serve's metric names where they mean the same."""

    def __init__(self, state: FrontendState, sup: Supervisor) -> None:
        self.state, self.sup = state, sup

    def collect(self):
        s = self.state.stats
        req = CounterMetricFamily("gateway_requests", "requests answered, by method and status code",
                                  labels=["method", "code"])
        for method, codes in s.get("answered", {}).items():
            for code, n in codes.items():
                req.add_metric([method, CODE_NAMES.get(int(code), code)], n)
        yield req
        refused = CounterMetricFamily("gateway_admission_refusals", "requests answered RESOURCE_EXHAUSTED on "
                                      "arrival: expected queue wait past max_queue_wait_ms or the deadline")
        refused.add_metric([], s.get("admission_refusals", 0))
        yield refused
        expired = CounterMetricFamily("gateway_expired", "requests whose deadline passed (or that were cancelled) "
                                      "while queued: answered DEADLINE_EXCEEDED without compute")
        expired.add_metric([], s.get("expired", 0))
        yield expired
        for name, key, what in (("gateway_batches", "batches", "batches handed to workers"),
                                ("gateway_batched_requests", "batched_requests", "requests in those batches"),
                                ("gateway_batch_seconds", "batch_seconds", "worker time of those batches")):
            c = CounterMetricFamily(name, what)
            c.add_metric([], s.get(key, 0))
            yield c
        g = GaugeMetricFamily("gateway_queue_requests", "requests waiting for a worker")
        g.add_metric([], s.get("queued", 0))
        yield g
        g = GaugeMetricFamily("gateway_workers_live", "workers connected to the frontend")
        g.add_metric([], self.state.workers)
        yield g
        c = CounterMetricFamily("gateway_worker_restarts", "workers replaced after they exited")
        c.add_metric([], self.sup.restarts)
        yield c


class Supervisor:
    """The frontend and its workers; `start` returns once every worker is connected."""

    RESTART_BACKOFF_S = 1.0  # a worker slot is not restarted more often than this

    def __init__(self, cfg: NativeConfig) -> None:
        self.cfg = cfg
        self.work = Path(cfg.workdir)
        self.sock = self.work / "workers.sock"
        self.state = FrontendState()
        self.frontend: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.started: list[float] = []
        self.restarts = 0
        self.image: Path | None = None
        self.reader: threading.Thread | None = None

    def _worker(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "inference_gateway.native.worker", str(self.sock),
                                 self.cfg.model, str(self.image)], env=child_env(None), preexec_fn=_die_with_parent)

    def _until(self, event: str, count: int | None = None) -> dict:
        """The frontend's next `event` (with `workers` >= count), failing at once if any child exits."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            for c in [self.frontend, *self.workers]:
                if c is not None and c.poll() is not None:
                    who = "the frontend" if c is self.frontend else f"worker {c.pid}"
                    raise StartError(f"{who} exited with code {c.returncode} before serving")
            try:
                msg = self.state.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg.get("event") == event and (count is None or msg.get("workers", 0) >= count):
                return msg
        raise StartError(f"not serving within {self.cfg.start_timeout_s} s")

    def start(self) -> dict:
        self.work.mkdir(parents=True, exist_ok=True)
        binary = build()
        self.image = image_of(self.cfg.model, Path(self.cfg.table_cache or self.work / "tables"))
        self.frontend = subprocess.Popen([str(binary), *self.cfg.frontend_args(self.sock)], stdout=subprocess.PIPE,
                                         text=True, preexec_fn=_die_with_parent)
        self.reader = threading.Thread(target=self.state.read, args=(self.frontend.stdout,), daemon=True)
        self.reader.start()
        port = self._until("serving")["port"]
        self.workers = [self._worker() for _ in range(self.cfg.workers)]
        self.started = [time.monotonic()] * len(self.workers)
        self._until("worker_joined", self.cfg.workers)
        return {"event": "serving", "port": port, "frontend_pid": self.frontend.pid,
                "worker_pids": [w.pid for w in self.workers], "table_image": str(self.image)}

    def watch_once(self) -> bool:
        """Replaces dead workers; False once the frontend itself has exited."""
        if self.frontend is None or self.frontend.poll() is not None:
            return False
        while not self.state.events.empty():
            msg = self.state.events.get()
            if msg.get("event") == "worker_lost":
                log.warning("a worker left the frontend (%d connected)", msg["workers"])
        for i, w in enumerate(self.workers):
            if w.poll() is None or time.monotonic() - self.started[i] < self.RESTART_BACKOFF_S:
                continue
            self.workers[i], self.started[i] = self._worker(), time.monotonic()
            self.restarts += 1
            log.warning("worker %d exited with code %s; replaced by %d", w.pid, w.returncode, self.workers[i].pid)
            print(json.dumps({"event": "worker_replaced", "old_pid": w.pid, "returncode": w.returncode,
                              "pid": self.workers[i].pid}), flush=True)
        return True

    def drain(self) -> int:
        """SIGTERM to the frontend (it answers what it holds within grace_s), then stop the workers; prints
        the frontend's final counters (`received` equals the sum of `answered` when nothing was cut off)."""
        code = 0
        if self.frontend is not None and self.frontend.poll() is None:
            self.frontend.terminate()
            try:
                code = self.frontend.wait(self.cfg.grace_s + 10)
            except subprocess.TimeoutExpired:
                self.frontend.kill()
                code = 1
        if self.reader is not None:
            self.reader.join(5)
        stop_all(self.workers, 10)
        final = {k: self.state.stats.get(k) for k in ("received", "answered", "expired", "admission_refusals")}
        print(json.dumps({"event": "drained", "frontend_exit_code": code, **final}), flush=True)
        return code

    def kill(self) -> None:
        stop_all([p for p in [self.frontend, *self.workers] if p is not None], 10)


def run(cfg: NativeConfig) -> int:
    """The gateway until SIGTERM (exit 0 after draining) or until the frontend dies (exit 1)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sup = Supervisor(cfg)
    try:
        msg = sup.start()
    except (StartError, BuildError, OSError) as e:
        sup.kill()
        raise SystemExit(f"inference-gateway serve-native: {e}") from None
    except Exception:
        sup.kill()
        raise
    if cfg.metrics_port >= 0:
        registry = CollectorRegistry()
        registry.register(NativeCollector(sup.state, sup))
        msg["metrics_port"] = serve_metrics(registry, cfg.host, cfg.metrics_port)
    print(json.dumps(msg), flush=True)
    while not stop.wait(0.2):
        if not sup.watch_once():
            log.error("the frontend exited with code %s; stopping", sup.frontend.returncode if sup.frontend else None)
            sup.kill()
            return 1
    return sup.drain()
