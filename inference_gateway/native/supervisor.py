"""serve-native's supervisor: writes each package's table image once, runs the native frontend
(frontend.cc) and `--workers` Python workers (worker.py) as its children, replaces a worker that dies,
serves management on its own address, exports the frontend's counters on /metrics, and drains on SIGTERM.

Why a supervisor in Python: the frontend stays small (accept, batch, answer); what changes rarely
(starting, replacing, loading models, metrics) is here. Nothing outlives it: the frontend asks for
SIGTERM when the supervisor dies, even by SIGKILL (PR_SET_PDEATHSIG), and a worker exits when its
socket to the frontend closes (or cannot connect).

Management (LoadModel / UnloadModel / SetDefaultVersion / ListModels on --management-port; the first three
need the control token and/or a client certificate) changes the model set by rolling the workers: a
worker's models are fixed for its life (its spec file), so new workers start with the new set, and once
every one of them is connected each old worker is retired: the frontend hands it no further batch and
closes its socket after answering the batch it holds. Requests never wait on a loading worker and none
fails in a swap; while it rolls, a request may be scored by either set. The table image of a version that
leaves the set is deleted once the workers that mapped it are retired.

Prints `{"event": "serving", "port", "management_port", "metrics_port", "frontend_pid", "worker_pids",
"allocator", "engine", "models"}` once every worker is connected (`allocator`: the malloc library preloaded into
the frontend and workers, or "glibc"; `engine`: the frontend's HTTP/2 engine, h2 or grpc); then one JSON line
per replaced worker and per model change.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as reflection_v1alpha
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inference_gateway.allocator import Allocator, AllocatorMissing, preload, with_preload
from inference_gateway.control_plane import CONTROL_PLANE, SERVICE_NAME, load_path
from inference_gateway.native import reflection
from inference_gateway.native.build import BuildError, build
from inference_gateway.prepared import Refused, Version, prepare, remove_image
from inference_gateway.requests import RequestError
from inference_gateway.versions import VersionTable
from protos import inference_pb2, inference_pb2_grpc
from protos.channels import status_name
from protos.durable import write_file_atomic
from protos.metrics import serve_metrics
from protos.paths import PathRefused, status_of_oserror
from protos.process import child_env, stop_all
from protos.rejects import DecodeGuard, Rejects
from protos.security import ControlPlaneAuth, TlsConfig, TokenRule, bind, full_names

log = logging.getLogger(__name__)


KILL_AFTER_S = 10.0  # how long past the grace a process told to stop (frontend, retired worker) has before SIGKILL
READER_JOIN_S = 5.0  # SIGTERM drain, after the frontend: its last stdout lines (the final counters)
WORKER_EXIT_S = 10.0  # then the workers, each
# The management server's threads, and how many of them model changes may hold at once: a LoadModel holds
# its thread while the package is verified and its image written (seconds to minutes for large tables),
# then while it waits for the roll lock. Changes past the limit are refused at once, so a unary health check
# (the readiness probe: kubelet gives it 1 s) and ListModels find a free thread (unless streams, a health
# Watch or reflection, hold the other two).
MANAGEMENT_THREADS = 4
MAX_CONCURRENT_CHANGES = MANAGEMENT_THREADS - 2


class Engine(enum.Enum):
    """The frontend's HTTP/2 engine (frontend.cc --engine): both serve every method of the inference port."""

    H2 = "h2"  # nghttp2 (and OpenSSL for TLS): 3-5 us of CPU a plaintext call (benchmarks/h2_floor.py)
    GRPC = "grpc"  # grpc++: 17-27 us a call


@dataclass
class NativeConfig:
    models: list[str] = field(default_factory=list)  # package directories loaded at start
    workers: int = 2
    host: str = "127.0.0.1"
    port: int = 0
    management_port: int = 0
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
    model_store: str = "model_store"  # LoadModel reads packages only from here
    token: str | None = None  # LoadModel / UnloadModel / SetDefaultVersion need it (None: open unless mTLS)
    predict_token_file: str | None = None  # Predict and ModelInfer need `authorization: Bearer <its token>`
    tls: TlsConfig | None = None  # the inference port's and the management port's
    start_timeout_s: float = 300.0
    access_log: bool = False  # the frontend writes one JSON line per answered call on stderr
    allocator: Allocator = Allocator.AUTO  # malloc of the frontend and its workers
    frontend_sched_batch: bool = True  # the frontend's dispatcher threads under SCHED_BATCH (--sched-batch)
    max_streams: int = 256  # HTTP/2 streams in flight per client connection (0: unbounded)
    engine: Engine = Engine.H2
    worker_nice: int = 10  # each worker's niceness once loaded: the frontend's threads run first (--worker-nice)

    @property
    def drain_s(self) -> float:
        """The longest a SIGTERM drain takes (a pod's terminationGracePeriodSeconds must outlast it)."""
        return self.grace_s + KILL_AFTER_S + READER_JOIN_S + WORKER_EXIT_S

    def frontend_args(self, sock: Path, reflection_table: Path) -> list[str]:
        return ["--addr", f"{self.host}:{self.port}", "--socket", str(sock), "--reflection", str(reflection_table),
                "--max-batch", str(self.max_batch_requests), "--max-batch-bytes", str(self.max_batch_bytes),
                "--max-delay-us", str(round(self.max_wait_ms * 1000)),
                "--max-queue-us", str(round(self.max_queue_wait_ms * 1000)),
                "--cost-us", str(self.request_cost_us), "--cost-ns-per-byte", str(self.byte_cost_ns),
                "--grace-ms", str(round(self.grace_s * 1000)), "--max-streams", str(self.max_streams),
                "--engine", self.engine.value,
                *self.credential_args(),
                *(["--access-log"] if self.access_log else []),
                *(["--sched-batch"] if self.frontend_sched_batch else [])]

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


@dataclass
class FrontendState:
    """What the frontend's stdout said last (its events and cumulative counters)."""

    stats: dict = field(default_factory=dict)
    workers: int = 0
    connected: set[int] = field(default_factory=set)  # pids of the workers connected now
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
                if msg.get("event") == "worker_joined":
                    self.connected = self.connected | {msg["pid"]}
                elif msg.get("event") in ("worker_lost", "worker_retired"):
                    self.connected = self.connected - {msg["pid"]}
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
                req.add_metric([method, status_name(int(code))], n)
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
        c = CounterMetricFamily("gateway_model_changes", "model sets rolled out to the workers (loads, unloads, "
                                "default changes)")
        c.add_metric([], self.sup.changes)
        yield c
        g = GaugeMetricFamily("gateway_models_loaded", "model versions loaded in every worker")
        g.add_metric([], len(self.sup.served))
        yield g


class Supervisor:
    """The frontend, its workers and the model set they serve; `start` returns once every worker is
    connected. Changes of the model set and replacements of dead workers hold `lock`."""

    RESTART_BACKOFF_S = 1.0  # a worker slot is not restarted more often than this

    def __init__(self, cfg: NativeConfig) -> None:
        self.cfg = cfg
        self.work = Path(cfg.workdir)
        self.sock = self.work / "workers.sock"
        self.cache = Path(cfg.table_cache or self.work / "tables")
        self.state = FrontendState()
        self.frontend: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.started: list[float] = []
        self.restarts = 0
        self.changes = 0
        self.table: VersionTable[Version] = VersionTable()
        # what the workers serve, with each version's default flag: the table once its workers are connected (a
        # change edits the table first, and ListModels, health and the gauge must not show a set still starting)
        self.served: list[tuple[Version, bool]] = []
        self.prepared: set[Path] = set()  # the table images this supervisor prepared (it deletes only these)
        self.pending: Counter[Path] = Counter()  # prepared for a LoadModel that has not reached `load` yet
        self._pending_lock = threading.Lock()
        self.spec: Path | None = None  # what the current workers were started with
        self.lock = threading.Lock()
        self.reader: threading.Thread | None = None
        self.malloc: str | None = None  # the library preloaded into the frontend and workers (None: glibc's)

    def _worker(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "inference_gateway.native.worker", str(self.sock),
                                 str(self.spec), str(self.cfg.worker_nice)],
                                env=with_preload(child_env(None), self.malloc))

    def _check_frontend(self) -> None:
        if self.frontend is not None and self.frontend.poll() is not None:
            raise StartError(f"the frontend exited with code {self.frontend.returncode}")

    def _until(self, event: str) -> dict:
        """The frontend's next `event`, failing at once if it exits."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            self._check_frontend()
            try:
                msg = self.state.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg.get("event") == event:
                return msg
        raise StartError(f"not serving within {self.cfg.start_timeout_s} s")

    def _connected(self, procs: list[subprocess.Popen]) -> None:
        """Waits until every one of `procs` is connected to the frontend; StartError naming the first that
        exits (or the frontend) before."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while not all(p.pid in self.state.connected for p in procs):
            self._check_frontend()
            for p in procs:
                if p.poll() is not None:
                    raise StartError(f"worker {p.pid} exited with code {p.returncode} before serving")
            if time.monotonic() > deadline:
                raise StartError(f"workers not connected within {self.cfg.start_timeout_s} s")
            time.sleep(0.05)

    def _write_spec(self) -> Path:
        """The model set as a worker reads it at start (a new file per set: running workers keep theirs)."""
        spec = {"models": [{"name": v.name, "version": v.version, "path": v.facts["path"], "image": str(v.image)}
                           for v in self.table.items()],
                "defaults": self.table.defaults, "default_model": self.table.default_model}
        path = self.work / f"models-{time.time_ns()}.json"
        write_file_atomic(path, json.dumps(spec, indent=1).encode())
        return path

    def start(self) -> dict:
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self.malloc = preload(self.cfg.allocator)
        except AllocatorMissing as e:
            raise StartError(str(e)) from None
        binary = build()
        for path in self.cfg.models:
            in_store = os.path.join(self.cfg.model_store, path)
            where = in_store if not os.path.isabs(path) and os.path.isdir(in_store) else path
            try:
                v = prepare(where, self.cache, env=child_env(None))
                self.prepared.add(v.image)
                self.table.add(v.name, v.version, v)
            except (Refused, RequestError) as e:
                raise StartError(f"--model {path}: {e.message}") from None
        self.spec = self._write_spec()
        table = reflection.write(self.work / "reflection.bin", reflection.inference_port_services())
        args = self.cfg.frontend_args(self.sock, table)
        self.frontend = subprocess.Popen([str(binary), *args], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
                                         env=with_preload(dict(os.environ), self.malloc))
        self.reader = threading.Thread(target=self.state.read, args=(self.frontend.stdout,), daemon=True)
        self.reader.start()
        port = self._until("serving")["port"]
        self.workers = [self._worker() for _ in range(self.cfg.workers)]
        self.started = [time.monotonic()] * len(self.workers)
        self._connected(self.workers)
        self.served = self.table.entries()
        return {"event": "serving", "port": port, "frontend_pid": self.frontend.pid,
                "worker_pids": [w.pid for w in self.workers], "allocator": self.malloc or "glibc",
                "engine": self.cfg.engine.value,
                "models": [{"name": v.name, "version": v.version, "table_image": str(v.image)}
                           for v in self.table.items()]}

    # --- the model set (under self.lock) ---------------------------------------------------------------
    def _roll(self, change: str) -> None:
        """Starts workers with the current table, then retires the old ones (each after its batch in hand);
        Refused, with the old workers still serving, when a new one fails to start."""
        old_spec, self.spec = self.spec, self._write_spec()
        new = [self._worker() for _ in range(self.cfg.workers)]
        try:
            self._connected(new)
        except StartError as e:
            self._retire(new)  # those already connected may be scoring a batch: retired, not killed
            self.spec.unlink(missing_ok=True)
            self.spec = old_spec
            raise Refused(grpc.StatusCode.INTERNAL, f"the workers could not start the new model set: {e}") from None
        old, self.workers, self.started = self.workers, new, [time.monotonic()] * len(new)
        entries, before = self.table.entries(), {(v.name, v.version) for v, _ in self.served}
        # until the frontend has read their retire orders the old workers may still take a batch: meanwhile only
        # the versions both sets serve are listed
        self.served = [(v, d) for v, d in entries if (v.name, v.version) in before]
        try:  # the swap is the change's commit point: nothing below may undo it
            self._retire(old)
            if old_spec is not None:
                old_spec.unlink(missing_ok=True)
        except Exception:
            log.exception("retiring the workers of the previous model set")
        self.served = entries
        self.changes += 1
        print(json.dumps({"event": "models_changed", "change": change, "worker_pids": [w.pid for w in new],
                          "models": [[v.name, v.version, d] for v, d in self.table.entries()]}), flush=True)

    def _retire(self, workers: list[subprocess.Popen]) -> None:
        """The frontend hands each connected one no further batch and closes its socket after the batch it
        holds; each then exits on EOF (one never connected is stopped at once)."""
        try:
            for w in workers:
                if w.poll() is None and w.pid in self.state.connected:
                    self.frontend.stdin.write(f"retire {w.pid}\n")
                elif w.poll() is None:
                    w.terminate()
            self.frontend.stdin.flush()
        except OSError:  # the frontend is gone (the gateway stops with it): nothing is left to drain
            for w in workers:
                if w.poll() is None:
                    w.terminate()
        deadline = time.monotonic() + self.cfg.grace_s + KILL_AFTER_S
        for w in workers:
            try:
                w.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not exit after it was retired; killing it", w.pid)
                w.kill()
                w.wait()

    def _changed(self, change: str, apply) -> object:
        """Applies `apply` to the table and rolls the workers; the table as it was when that fails."""
        saved = (self.table.models, self.table.defaults, self.table.default_model)
        try:
            out = apply()
            self._roll(change)
            return out
        except BaseException as e:
            self.table.models, self.table.defaults, self.table.default_model = saved
            if isinstance(e, RequestError):
                raise Refused(e.code, e.message) from None
            raise
        finally:
            self._drop_unused_images()

    def _drop_unused_images(self) -> None:
        """Deletes the images this supervisor prepared that no version of the model set names any more (an
        unloaded version's, a refused load's): each is as large as its package's tables, and a gateway that
        swaps models daily would otherwise fill its disk. Called after a change, once the workers of the old
        set are retired (a worker still mapping one keeps its pages; only new workers need the file, and they
        start with the current set), and never one a LoadModel still on its way to `load` holds. An image an
        earlier run wrote into a kept --table-cache counts as prepared once a version of this run uses it."""
        named = {v.image for v in self.table.items()}
        with self._pending_lock:
            keep = named | set(self.pending)
        for image in list(self.prepared - keep):
            if not remove_image(image):
                continue
            self.prepared.discard(image)
            print(json.dumps({"event": "image_deleted", "image": str(image)}), flush=True)

    def prepare(self, path: Path, name: str, version: int) -> Version:
        """The package verified and its table image written (slow: called without the lock, so dead workers
        are still replaced meanwhile); `load` then adds it."""
        if name and version:
            try:
                self.table.check_new(name, version)  # before the package is read
            except RequestError as e:
                raise Refused(e.code, e.message) from None
        v = prepare(path, self.cache, name, version, env=child_env(None))
        with self._pending_lock:  # before it counts as prepared: no change deletes it on its way to `load`
            self.pending[v.image] += 1
        self.prepared.add(v.image)
        return v

    def load(self, v: Version, make_default: bool = False) -> Version:
        """Adds a version `prepare` returned and rolls the workers (under the lock)."""
        with self._pending_lock:
            self.pending[v.image] -= 1
            if self.pending[v.image] <= 0:
                del self.pending[v.image]
        if not v.image.exists():
            raise Refused(grpc.StatusCode.ABORTED, f"path: its table image {v.image} was deleted before it was loaded "
                                                   "(by hand?); load it again")

        def add() -> Version:
            self.table.add(v.name, v.version, v, make_default)
            return v
        return self._changed(f"load {v.name} v{v.version}", add)

    def unload(self, name: str, version: int) -> None:
        self._changed(f"unload {name} v{version}", lambda: self.table.remove(name, version))

    def set_default(self, name: str, version: int) -> Version:
        v = self.table.resolve(name, version) if version else None
        if v is not None and self.table.defaults.get(v.name) == version:
            return v  # already the default: no roll
        return self._changed(f"default {name} v{version}", lambda: self.table.set_default(name, version))

    def infos(self) -> list[inference_pb2.ModelInfo]:
        return [v.info(is_default) for v, is_default in self.served]

    # --- supervision -------------------------------------------------------------------------------------
    def watch_once(self) -> bool:
        """Replaces dead workers; False once the frontend itself has exited."""
        if self.frontend is None or self.frontend.poll() is not None:
            return False
        while not self.state.events.empty():
            msg = self.state.events.get()
            if msg.get("event") == "worker_lost":
                log.warning("worker %s left the frontend (%d connected)", msg.get("pid"), msg["workers"])
        if not self.lock.acquire(blocking=False):
            return True  # the model set is being rolled: its workers are checked then
        try:
            for i, w in enumerate(self.workers):
                if w.poll() is None or time.monotonic() - self.started[i] < self.RESTART_BACKOFF_S:
                    continue
                self.workers[i], self.started[i] = self._worker(), time.monotonic()
                self.restarts += 1
                log.warning("worker %d exited with code %s; replaced by %d", w.pid, w.returncode, self.workers[i].pid)
                print(json.dumps({"event": "worker_replaced", "old_pid": w.pid, "returncode": w.returncode,
                                  "pid": self.workers[i].pid}), flush=True)
        finally:
            self.lock.release()
        return True

    def drain(self) -> int:
        """SIGTERM to the frontend (it answers what it holds within grace_s), then stop the workers; prints
        the frontend's final counters (`received` equals the sum of `answered` when nothing was cut off)."""
        code = 0
        if self.frontend is not None and self.frontend.poll() is None:
            self.frontend.terminate()
            try:
                code = self.frontend.wait(self.cfg.grace_s + KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                self.frontend.kill()
                code = 1
        if self.reader is not None:
            self.reader.join(READER_JOIN_S)
        with self.lock:
            stop_all(self.workers, WORKER_EXIT_S)
        final = {k: self.state.stats.get(k) for k in ("received", "answered", "expired", "admission_refusals")}
        print(json.dumps({"event": "drained", "frontend_exit_code": code, **final}), flush=True)
        return code

    def kill(self) -> None:
        stop_all([p for p in [self.frontend, *self.workers] if p is not None], 10)


class ManagementServicer(inference_pb2_grpc.InferenceGatewayServicer):
    """The control plane on its own address (Predict is UNIMPLEMENTED here); one change rolls the workers at
    a time, and at most MAX_CONCURRENT_CHANGES are in progress (more are refused at once). Its gRPC
    health (what a readiness probe asks) is SERVING only while a model is loaded, as serve's is, and a
    worker is connected to score it; published after each change and every watch of the supervisor."""

    def __init__(self, sup: Supervisor, checks: health.HealthServicer) -> None:
        self.sup, self.checks = sup, checks
        self._publishing = threading.Lock()  # read and set together: a late publisher never sets a stale state
        self._changes = threading.BoundedSemaphore(MAX_CONCURRENT_CHANGES)
        self.publish()

    @contextlib.contextmanager
    def _change(self, context: grpc.ServicerContext) -> Iterator[None]:
        """A model change's turn; RESOURCE_EXHAUSTED at once (nothing changed) when MAX_CONCURRENT_CHANGES
        are already in progress, instead of a thread that health checks would wait behind."""
        if not self._changes.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{MAX_CONCURRENT_CHANGES} model changes (LoadModel, UnloadModel, SetDefaultVersion) are "
                          "already in progress, the most this gateway runs at once; nothing was changed: retry "
                          "once one has finished")
        try:
            yield
        finally:
            self._changes.release()

    def publish(self) -> None:
        with self._publishing:
            # the frontend notices a dead worker only when it next sends it a batch: alive processes count
            alive = {w.pid for w in self.sup.workers if w.poll() is None}
            ready = bool(self.sup.served) and bool(self.sup.state.connected & alive)
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            for svc in ("", SERVICE_NAME):
                self.checks.set(svc, status)

    def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(models=self.sup.infos())

    def Predict(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Predict is served on the gateway's --port, not on its "
                                                     "management address")

    def PredictStream(self, request_iterator, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "PredictStream is served on the gateway's --port, not on its "
                                                     "management address")

    def LoadModel(self, request, context):
        try:
            path = load_path(request, self.sup.cfg.model_store)
            with self._change(context):
                v = self.sup.prepare(path, request.name, request.version)
                with self.sup.lock:
                    v = self.sup.load(v, request.make_default)
                    info = v.info(self.sup.table.defaults.get(v.name) == v.version)
            self.publish()
            return info
        except (PathRefused, Refused) as e:
            context.abort(e.code, e.message)
        except OSError as e:
            refused = status_of_oserror(e, "path", request.path)
            context.abort(refused.code, refused.message)

    def UnloadModel(self, request, context):
        try:
            with self._change(context), self.sup.lock:
                self.sup.unload(request.name, request.version)
        except Refused as e:
            context.abort(e.code, e.message)
        self.publish()
        return inference_pb2.UnloadModelResponse()

    def SetDefaultVersion(self, request, context):
        try:
            with self._change(context), self.sup.lock:
                return self.sup.set_default(request.name, request.version).info(True)
        except (RequestError, Refused) as e:
            context.abort(e.code, e.message)


def management_server(sup: Supervisor, registry: CollectorRegistry) -> tuple[grpc.Server, int, ManagementServicer]:
    """The management address: InferenceGateway's control plane, gRPC health and reflection."""
    rejects = Rejects(registry, log)
    interceptors: list[grpc.ServerInterceptor] = []
    if sup.cfg.token:
        interceptors.append(ControlPlaneAuth([TokenRule(sup.cfg.token, full_names(SERVICE_NAME, CONTROL_PLANE))],
                                             on_refusal=rejects.refused))
    interceptors.append(DecodeGuard(rejects))
    server = grpc.server(ThreadPoolExecutor(MANAGEMENT_THREADS, thread_name_prefix="management"),
                         interceptors=interceptors)
    checks = health.HealthServicer()
    servicer = ManagementServicer(sup, checks)
    inference_pb2_grpc.add_InferenceGatewayServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    reflection_v1alpha.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection_v1alpha.SERVICE_NAME),
                                                server)
    port = bind(server, f"{sup.cfg.host}:{sup.cfg.management_port}", sup.cfg.tls)
    server.start()
    return server, port, servicer


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
    registry = CollectorRegistry()
    try:
        server, msg["management_port"], management = management_server(sup, registry)
    except (OSError, RuntimeError) as e:
        sup.kill()
        raise SystemExit(f"inference-gateway serve-native: --management-port: {e}") from None
    if cfg.metrics_port >= 0:
        registry.register(NativeCollector(sup.state, sup))
        msg["metrics_port"] = serve_metrics(registry, cfg.host, cfg.metrics_port)
    print(json.dumps(msg), flush=True)
    while not stop.wait(0.2):
        if not sup.watch_once():
            log.error("the frontend exited with code %s; stopping", sup.frontend.returncode if sup.frontend else None)
            server.stop(0)
            sup.kill()
            return 1
        management.publish()
    management.checks.enter_graceful_shutdown()
    server.stop(1)
    return sup.drain()
