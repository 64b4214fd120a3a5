"""The gateway on Triton's C++ frontend: a supervisor that runs `tritonserver` with our model in its
Python-backend worker processes, one shared copy of the tables, and management on its own address.

Why: a Python gRPC server spends ~0.3 ms of CPU per unary RPC before any model work; tritonserver
(bundled in the `nvidia-pytriton` wheel, which we install `--no-deps` and use only for its binaries)
accepts, batches and answers requests in C++ and hands whole batches to `--workers` Python processes
(its instance group). The supervisor:

- verifies each package, writes its TBE host buffer once as a table image (shared_tables) and lays it
  out as a Triton model version whose model.py maps that image read-only in every worker;
- starts tritonserver (KServe v2 gRPC on `--port`, explicit model control) and restarts it if it
  dies; replaces a worker (stub) that dies by reloading that version (Triton does not);
- serves Predict / PredictStream / ListModels of the project's API on `--predict-port`, forwarded to
  tritonserver's KServe v2 port (predict_proxy: checked as `serve` checks them, encoded in its OIP schema);
- serves LoadModel / UnloadModel / SetDefaultVersion / ListModels on `--management-port` (the
  project's InferenceGateway service, inference methods UNIMPLEMENTED there) plus gRPC health, and
  applies each to every worker through Triton's repository API: a new version loads beside the old
  one, and an unloaded version leaves only after its in-flight requests are answered;
- guards the control plane like `serve`: the management port's control RPCs need the control token
  (and/or mTLS); on Triton's own port every group that changes or reveals server state (repository,
  shared memory, statistics, trace, logging) needs a random per-process secret only the supervisor
  holds (`--grpc-restricted-protocol`), so a client there has health, metadata, config and inference
  only;
- with `--follow`, gives the newest version of the first model a private copy of its table image and runs
  image_follower beside tritonserver (restarted if it dies): the shards' row deltas and dense publishes are
  applied in place, each delta entry seen whole by the workers (image_state's sequence lock);
- on SIGTERM: management health NOT_SERVING, SIGTERM to tritonserver (which stops taking requests
  and answers those in flight within --grace-s), then exits 0.

Unversioned requests go to the highest loaded version (Triton's rule), so SetDefaultVersion accepts
only that version; a hot swap is LoadModel(new) then UnloadModel(old).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from inference_gateway.allocator import Allocator, AllocatorMissing, preload, with_preload
from inference_gateway.control_plane import CONTROL_PLANE, load_path
from inference_gateway.control_plane import SERVICE_NAME as MANAGEMENT_SERVICE
from inference_gateway.image_state import ImageState, follow_path, remove_files
from inference_gateway.prepared import Refused, Version, prepare, remove_image
from inference_gateway.requests import IDS, LENGTHS, VALUES, Limits, lengths_input, values_input
from protos import inference_pb2, inference_pb2_grpc
from protos import triton_repository_pb2 as repository
from protos.paths import PathRefused, status_of_oserror
from protos.process import free_port, stop_all
from protos.rejects import AioDecodeGuard, Rejects
from protos.security import AioControlPlaneAuth, TlsConfig, TokenRule, bind, full_names

if TYPE_CHECKING:  # importing these loads package `inference`, which tritonclient's stubs also define
    from inference_gateway.predict_proxy import ModelSpec
    from protos import open_inference_pb2_grpc as oip_grpc

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
# Triton's gRPC protocol groups that change or reveal server state: only the supervisor, which sends
# ADMIN_HEADER with its per-process secret, may use them (RepositoryModelLoad with `file:` parameters
# would otherwise let anyone who reaches --port upload a model.py, i.e. run code in a worker)
RESTRICTED = ("model-repository", "shared-memory", "statistics", "trace", "logging")
ADMIN_KEY = "recsys-admin"
ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_KEY}"  # Triton prefixes a restricted protocol's key with this
TRITON_SERVICE = "/inference.GRPCInferenceService/"  # Triton's repository methods are called by path


class FrontendError(RuntimeError):
    """tritonserver is missing or would not start; the message says what to do."""


@dataclass(frozen=True)
class TritonDist:
    """The binaries of the nvidia-pytriton wheel (its Python code is not used)."""

    server: Path
    backend_lib: Path  # libtriton_python.so
    backend_utils: Path  # triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version
    libs: Path  # the wheel's bundled shared libraries

    @classmethod
    def find(cls) -> TritonDist:
        spec = importlib.util.find_spec("pytriton")  # finds without importing (its __init__ needs gevent)
        if spec is None or not spec.submodule_search_locations:
            raise FrontendError("tritonserver: not installed; `pip install --no-deps nvidia-pytriton==0.7.0` "
                                "(--no-deps: its numpy<2 pin would downgrade numpy; only its binaries are used)")
        pkg = Path(next(iter(spec.submodule_search_locations)))
        ts = pkg / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        backend = ts / "backends" / "python"
        dist = cls(ts / "bin" / "tritonserver", backend / "libtriton_python.so",
                   backend / "triton_python_backend_utils.py",
                   ts / "python_backend_stubs" / version / "triton_python_backend_stub",
                   pkg.parent / "nvidia_pytriton.libs")
        paths = (dist.server, dist.backend_lib, dist.backend_utils, dist.stub, dist.libs)
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise FrontendError(f"tritonserver: {missing[0]} missing from the nvidia-pytriton install")
        return dist

    def backend_dir(self, workdir: Path) -> Path:
        """backends/python with this Python's stub beside the backend (where Triton looks for it)."""
        out = workdir / "backends"
        py = out / "python"
        py.mkdir(parents=True, exist_ok=True)
        for src in (self.backend_lib, self.backend_utils, self.stub):
            dst = py / src.name
            if not dst.exists():
                dst.symlink_to(src)
        return out

    def env(self, allocator_lib: str | None = None) -> dict[str, str]:
        """The stub links libpython3.x.so by soname: without the interpreter's own LIBDIR first it picks the
        system's (Debian's 3.11.2 under pyenv's 3.11.7 stdlib: `RLock._recursion_count` AttributeError).
        PATH starts at this interpreter's bin so the stub runs with this environment's site-packages.
        `allocator_lib` (from `preload()`) goes to LD_PRELOAD: the stubs inherit it from tritonserver."""
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, str(self.libs), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return with_preload(env, allocator_lib)

    def command(self, repository: Path, workdir: Path, host: str, port: int, pool: int) -> list[str]:
        """tritonserver serving `repository` with this Python's backend, KServe v2 gRPC only on host:port,
        quiet logs, and `pool` gRPC request/response objects kept for reuse (Triton's default, 8, frees and
        allocates them again for every request past 8 in flight: ~10% of its CPU at 64 in flight)."""
        return [str(self.server), f"--model-repository={repository}",
                f"--backend-directory={self.backend_dir(workdir)}", "--disable-auto-complete-config",
                f"--grpc-address={host}", f"--grpc-port={port}", "--allow-http=false", "--log-verbose=0",
                f"--grpc-infer-allocation-pool-size={pool}"]

    def check_libraries(self) -> None:
        """Every shared library of tritonserver and the stub resolves under env(), libpython to this
        interpreter's own (a Python built without --enable-shared has none: the stub would load another
        Python's, or none). FrontendError naming what is missing; the image build runs this."""
        env = self.env()
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        for binary in (self.server, self.stub):
            out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, timeout=60).stdout
            missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
            if missing:
                raise FrontendError(f"tritonserver: {binary} misses shared libraries {missing}")
            libpython = [line.split("=>")[-1].split()[0] for line in out.splitlines() if "libpython" in line]
            if binary == self.stub and not all(p.startswith(libdir + "/") for p in libpython):
                raise FrontendError(f"tritonserver: the Python stub loads {libpython}, not this interpreter's "
                                    f"libpython from {libdir!r} (Python must be built with --enable-shared)")


POOL_CAP = 1024  # most gRPC request/response objects tritonserver keeps (a W2 request's is ~60 KB)


@dataclass
class FrontendConfig:
    models: list[str] = field(default_factory=list)
    workers: int = 2
    host: str = "127.0.0.1"
    port: int = 0  # KServe v2 gRPC (tritonserver); 0: a free one
    management_port: int = 0
    predict_port: int = 0  # the project's Predict / PredictStream / ListModels (inference side, not management)
    # where Predict is forwarded as ModelInfer: None = this supervisor's tritonserver (--port, loopback); any
    # other server of serve's OIP schema works the same (`inference-gateway serve`: tests)
    predict_target: str | None = None
    predict_token: str | None = None  # Predict / PredictStream need it as a bearer token; None: open
    metrics_port: int | None = 0  # tritonserver's Prometheus port; None: off
    max_batch_size: int = 256
    max_wait_us: int = 500  # Triton's max_queue_delay (the CLI's --max-wait-ms help says why 0.5 ms)
    max_queue: int = 0  # requests waiting per model before Triton refuses more; 0: unbounded (queue_policy)
    max_queue_wait_ms: float = 0.0  # 0: no bound of its own; else the queue bound (queue_policy)
    sample_cost_us: float = 120.0  # one worker's time per sample, frontend share included (see the CLI's help)
    request_samples: int = 1  # samples of a typical request (Triton's queue bound counts requests)
    grace_s: float = 10.0
    workdir: Path = Path("triton-gateway")
    table_cache: Path | None = None  # default: <workdir>/tables
    model_store: str = "model_store"
    token: str | None = None  # management LoadModel / UnloadModel / SetDefaultVersion; None: open unless mTLS
    # the management and Predict ports' (with client_ca every call there needs a certificate); tritonserver's
    # own port stays plaintext: its TLS would need the supervisor to hold a client identity of its own
    tls: TlsConfig | None = None
    allocator: Allocator = Allocator.AUTO  # malloc of tritonserver and its workers
    follow: str | None = None  # online freshness: the Redis of the shards' deltas (image_follower)
    delta_namespace: str = "recsys"
    snapshots: str | None = None  # where the follower resynchronises from after a gap


def queue_policy(cfg: FrontendConfig) -> tuple[int, int]:
    """(max_queue_size in requests, queue timeout in µs; 0: none) for Triton's dynamic batcher; (0, 0): no
    queue policy at all, the default.

    Why none by default: Triton 2.51 lets its batcher build the next batches ahead of the workers
    ("prefetch") only when the queue has no size, timeout or timeout override (scheduler_utils.cc); with
    any of them the batcher, finding every worker busy, waits for one on a condition variable that a
    worker going idle never signals (dynamic_batch_scheduler.cc, WaitForPayloadSlotAvailable): only the
    next arriving request or its 500 ms timeout wakes it. h2load, INT8, 64 streams, one worker: 732 req/s
    and a 510 ms maximum bounded, 3,842 and 44 ms unbounded; two: +6% (benchmarks/triton_ab.py).

    With a bound, Triton admits by queue length only (in requests, whatever their size), so
    --max-queue-wait-ms becomes a length: the requests the workers get through in that time at
    --sample-cost-us per sample and --request-samples per request (a request larger than that waits
    longer than the bound says; a smaller one is refused early). A request arriving at a full queue is
    refused at once; the same bound as the queue timeout (REJECT) catches those that still wait longer,
    and a client may give its own (the request parameter `timeout`, µs)."""
    if not cfg.max_queue_wait_ms:
        return cfg.max_queue, 0
    wait_us = cfg.max_queue_wait_ms * 1000
    derived = max(1, int(wait_us * cfg.workers / (cfg.sample_cost_us * cfg.request_samples)))
    return (min(cfg.max_queue, derived) if cfg.max_queue else derived), int(wait_us)


def config_pbtxt(v: Version, cfg: FrontendConfig) -> str:
    """serve's Open Inference Protocol schema in its batched form: Triton checks every input's first
    dimension against the batch size (ragged inputs too), so lengths are [B, 1] and values [B, K]
    (allow_ragged_batch: requests with different K share a batch; the worker gets each request's own).
    Or the compact forms instead of them all: single-hot `ids` [B, features], or `lengths` [B, features] and
    `values` [B, K] (ragged) for any bags; so every input but dense is optional, and the worker checks that
    a request sent one whole form (Triton batches only requests with the same inputs)."""
    features = v.facts["features"]
    sparse = "".join(f""",
  {{ name: "{lengths_input(f)}" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "{values_input(f)}" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true optional: true }}"""
                     for f in features)
    size, timeout_us = queue_policy(cfg)
    timeout = (f" timeout_action: REJECT default_timeout_microseconds: {timeout_us} allow_timeout_override: true"
               if timeout_us else "")
    policy = f"\n  default_queue_policy {{ max_queue_size: {size}{timeout} }}" if size else ""
    return f"""name: "{v.name}"
backend: "python"
max_batch_size: {cfg.max_batch_size}
version_policy: {{ all: {{}} }}
dynamic_batching {{
  max_queue_delay_microseconds: {cfg.max_wait_us}{policy}
}}
input [
  {{ name: "dense" data_type: TYPE_FP32 dims: [ {v.facts["dense_features"]} ] }},
  {{ name: "{IDS}" data_type: TYPE_INT64 dims: [ {len(features)} ] optional: true }},
  {{ name: "{LENGTHS}" data_type: TYPE_INT64 dims: [ {len(features)} ] optional: true }},
  {{ name: "{VALUES}" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true optional: true }}{sparse}
]
output [ {{ name: "scores" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ count: {cfg.workers} kind: KIND_CPU }} ]
"""


def _model_py(package: Path, image: Path) -> str:
    return (f'"""Generated by inference_gateway.triton_frontend: one version of the model."""\n'
            f"import sys\n\nsys.path.insert(0, {str(ROOT)!r})\n"
            f"from inference_gateway.triton_model import make_triton_model  # noqa: E402\n\n"
            f"TritonPythonModel = make_triton_model({str(package)!r}, {str(image)!r})\n")


class Supervisor:
    def __init__(self, cfg: FrontendConfig, dist: TritonDist) -> None:
        self.cfg, self.dist = cfg, dist
        self.workdir = cfg.workdir.resolve()
        self.repo = self.workdir / "repository"
        self.retired = self.workdir / "retired"
        self.table_cache = (cfg.table_cache or self.workdir / "tables").resolve()
        self.port = cfg.port or free_port(cfg.host)
        self.metrics_port = (cfg.metrics_port or free_port(cfg.host)) if cfg.metrics_port is not None else None
        try:
            self.allocator = preload(cfg.allocator)  # None: glibc
        except AllocatorMissing as e:
            raise FrontendError(str(e)) from None
        self.models: dict[str, dict[int, Version]] = {}
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.restarts = 0
        self.replaced = 0
        self.lock = asyncio.Lock()
        self.health = health.aio.HealthServicer()
        self.channel: grpc.Channel | None = None
        self.triton: oip_grpc.GRPCInferenceServiceStub | None = None  # our own stubs: no tritonclient here
        self._load_model = self._unload_model = None  # Triton's repository extension (triton_repository.proto)
        # the credential of Triton's RESTRICTED groups: never written to a file or logged; see _start_triton
        self._admin = ((ADMIN_HEADER, secrets.token_urlsafe(32)),)
        # --follow: the model followed (the first loaded), the version the follower writes into, its process
        self.follow_name: str | None = None
        self.followed: tuple[Version, Path] | None = None  # (version, its private image)
        self.follower: subprocess.Popen | None = None
        self.follower_image: Path | None = None  # the image that follower process writes
        self.follower_restarts = 0
        self._follower_backoff_s, self._follower_retry_at = 0.0, 0.0  # a follower that keeps dying waits longer
        self._follower_started_at = 0.0
        # the follower's Prometheus port: the same across its restarts, so a scraper keeps one target
        self.follower_metrics_port = (free_port(cfg.host) if cfg.follow and cfg.metrics_port is not None else None)

    # --- tritonserver -----------------------------------------------------------------------------
    def _start_triton(self) -> None:
        from protos import open_inference_pb2 as oip  # package `inference`: only in the serving process (oip.py)
        from protos import open_inference_pb2_grpc as oip_grpc

        for d in (self.repo, self.retired, self.table_cache):
            d.mkdir(parents=True, exist_ok=True)
        pool = min(queue_policy(self.cfg)[0] or POOL_CAP, POOL_CAP)  # request objects reused up to the queue bound
        args = [*self.dist.command(self.repo, self.workdir, self.cfg.host, self.port, pool),
                "--model-control-mode=explicit", f"--exit-timeout-secs={max(1, int(self.cfg.grace_s))}",
                "--strict-readiness=true"]
        # tritonserver takes this secret only as an argument, so a local user who can read
        # /proc/<pid>/cmdline (`ps`, unless /proc is mounted hidepid=2) sees it: it is per process and
        # guards only this tritonserver, and never goes to a file or a log
        args.append(f"--grpc-restricted-protocol={','.join(RESTRICTED)}:{ADMIN_KEY}={self._admin[0][1]}")
        if self.metrics_port is None:
            args.append("--allow-metrics=false")
        else:
            args += [f"--metrics-address={self.cfg.host}", f"--metrics-port={self.metrics_port}",
                     "--allow-gpu-metrics=false"]
        log_file = open(self.workdir / "tritonserver.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(args, env=self.dist.env(self.allocator), stdout=log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # a terminal's Ctrl-C reaches the supervisor only
        log_file.close()
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(f"{self.cfg.host}:{self.port}")
        self.triton = oip_grpc.GRPCInferenceServiceStub(self.channel)
        self._load_model = self.channel.unary_unary(
            TRITON_SERVICE + "RepositoryModelLoad",
            request_serializer=repository.RepositoryModelLoadRequest.SerializeToString,
            response_deserializer=repository.RepositoryModelLoadResponse.FromString)
        self._unload_model = self.channel.unary_unary(
            TRITON_SERVICE + "RepositoryModelUnload",
            request_serializer=repository.RepositoryModelUnloadRequest.SerializeToString,
            response_deserializer=repository.RepositoryModelUnloadResponse.FromString)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FrontendError(f"tritonserver exited {self.proc.returncode} at start; see "
                                    f"{self.workdir / 'tritonserver.log'}")
            try:
                if self.triton.ServerLive(oip.ServerLiveRequest(), timeout=5).live:
                    return
            except grpc.RpcError:  # not listening yet
                pass
            time.sleep(0.2)
        raise FrontendError("tritonserver: not live within 120 s")

    def _triton_load(self, name: str) -> None:
        """Triton's explicit load of `name`: loads version directories that appeared, unloads (after their
        in-flight requests) those that disappeared, keeps the rest serving."""
        try:
            self._load_model(repository.RepositoryModelLoadRequest(model_name=name), metadata=self._admin)
        except grpc.RpcError as e:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"path: tritonserver refused model {name!r}: "
                                                               f"{e.details()}") from None

    # --- model management (serialized by self.lock, run off the event loop) -----------------------
    def _prepare(self, path: str, name: str, version: int) -> Version:
        return prepare(path, self.table_cache, name, version, env=self.dist.env())

    def add(self, path: str, name: str = "", version: int = 0) -> Version:
        v = self._prepare(path, name, version)
        try:
            return self._add(v)
        except BaseException:
            self._drop_image(v)
            raise

    def _drop_image(self, v: Version) -> None:
        """Deletes `v`'s cached table image (as large as its tables) unless a loaded version names it: the
        version was unloaded or refused. Workers still draining it keep their mappings (Linux frees the
        pages with the last one); no new one will map it."""
        if not any(o.image == v.image for vs in self.models.values() for o in vs.values()):
            remove_image(v.image)

    def _add(self, v: Version) -> Version:
        versions = self.models.get(v.name, {})
        if v.version in versions:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"version: model {v.name!r} version {v.version} is "
                                                          "already loaded")
        if versions:
            first = next(iter(versions.values())).facts
            if (first["features"], first["dense_features"]) != (v.facts["features"], v.facts["dense_features"]):
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"path: model {v.name!r} v{v.version} has other features or dense_features than the "
                              "loaded versions (one Triton model, one input signature); load it under another name")
        mdir = self.repo / v.name
        mdir.mkdir(parents=True, exist_ok=True)
        cfg_path = mdir / "config.pbtxt"
        if not versions:
            tmp = cfg_path.with_suffix(".tmp")
            tmp.write_text(config_pbtxt(v, self.cfg))
            os.replace(tmp, cfg_path)
        follow = self._follows(v)
        image = self._private_image(v) if follow else Path(v.facts["image"])
        vdir = mdir / str(v.version)
        tmp = mdir / f".{v.version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "model.py").write_text(_model_py(Path(v.facts["path"]), image))
        shutil.rmtree(vdir, ignore_errors=True)
        os.replace(tmp, vdir)
        try:
            self._triton_load(v.name)
        except Refused:
            shutil.rmtree(vdir, ignore_errors=True)
            if not versions:
                shutil.rmtree(mdir, ignore_errors=True)
            if follow:  # the private copy made for it
                remove_files(image)
            raise
        self.models[v.name] = {**versions, v.version: v}
        if follow:
            self.follow_name, self.followed = v.name, (v, image)
            self.start_follower()
        return v

    # --- online freshness (--follow) -----------------------------------------------------------------
    def _follows(self, v: Version) -> bool:
        """The newest version of the followed model (the first one loaded) is the one deltas go to."""
        if not self.cfg.follow or self.follow_name not in (None, v.name):
            return False
        return self.followed is None or v.version > self.followed[0].version

    def _private_image(self, v: Version) -> Path:
        """A copy of the version's cached image that only its follower writes (the cache stays the
        package's bytes), with a fresh state file, before any worker maps it."""
        live = self._private_image_path(v.name, v.version)
        live.parent.mkdir(parents=True, exist_ok=True)
        tmp = live.with_name(f".{live.name}.tmp-{secrets.token_hex(4)}")
        shutil.copyfile(v.facts["image"], tmp)
        os.replace(tmp, live)
        remove_files(live, keep_image=True)  # an earlier run's state, dense arch and position
        ImageState.create(live)
        return live

    def _private_image_path(self, name: str, version: int) -> Path:
        return self.workdir / "live" / f"{name}-v{version}.tbe"

    def start_follower(self) -> None:
        """(Re)starts image_follower on the followed version; its log is <workdir>/follower.log."""
        self.stop_follower()
        if self.followed is None or not self.cfg.follow:
            return
        v, image = self.followed
        args = [sys.executable, "-m", "inference_gateway.image_follower", "--package", v.facts["path"],
                "--image", str(image), "--redis", self.cfg.follow, "--namespace", self.cfg.delta_namespace]
        if self.cfg.snapshots:
            args += ["--snapshots", self.cfg.snapshots]
        if self.follower_metrics_port is not None:
            args += ["--metrics-host", self.cfg.host, "--metrics-port", str(self.follower_metrics_port)]
        with open(self.workdir / "follower.log", "ab") as out:
            self.follower = subprocess.Popen(args, env=self.dist.env(), stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        self.follower_image, self._follower_started_at = image, time.monotonic()
        log.info("following %s into %s v%d (pid %d)", self.cfg.follow, v.name, v.version, self.follower.pid)

    def stop_follower(self) -> None:
        """Stops the follower (SIGTERM; SIGKILL past 10 s, e.g. inside a long resync) and recovers its image's
        sequence lock if it died inside a write, so no worker of that version waits for it."""
        proc, image = self.follower, self.follower_image
        self.follower = self.follower_image = None
        if proc is None:
            return
        stop_all([proc], 10)
        self._recover(image)

    @staticmethod
    def _recover(image: Path | None) -> None:
        try:
            if image is not None and ImageState(image, writable=True).recover():
                log.error("the delta follower of %s died inside a write: workers read on (that write's rows may "
                          "be half written until a follower writes them again)", image.name)
        except OSError as e:  # the version was unloaded and its files removed meanwhile
            log.warning("recovering %s: %s", image, e)

    async def _watch_follower(self) -> None:
        """Restarts a follower that died, under the lock (a LoadModel may be switching it), with a backoff
        that doubles while it keeps dying (0.5 s .. 60 s) and resets once one lived a minute."""
        async with self.lock:
            proc = self.follower
            if proc is None or proc.poll() is None or self.stopping:
                return
            self._recover(self.follower_image)  # at once: workers must not wait out the backoff
            now = time.monotonic()
            if now < self._follower_retry_at:
                return
            lived = now - self._follower_started_at
            log.error("the delta follower exited %s after %.0f s (see follower.log); restarting", proc.returncode,
                      lived)
            self.follower_restarts += 1
            await asyncio.to_thread(self.start_follower)
            self._follower_backoff_s = 0.5 if lived > 60 else min(max(self._follower_backoff_s * 2, 0.5), 60.0)
            self._follower_retry_at = time.monotonic() + self._follower_backoff_s

    def applied_steps(self, v: Version) -> dict[str, int]:
        """What the follower applied to `v` (empty when `v` is not followed or nothing was written yet)."""
        if self.followed is None or self.followed[0] is not v:
            return {}
        try:
            saved = json.loads(follow_path(self.followed[1]).read_text())["applied_steps"]
            return {k: int(s) for k, s in saved.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def remove(self, name: str, version: int) -> None:
        if not name:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "name: required")
        if version < 1:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "version: required (>= 1)")
        versions = dict(self.models.get(name, {}))
        if version not in versions:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"version: model {name!r} has no version {version} loaded "
                                                     f"(loaded: {sorted(versions)})")
        removed = versions.pop(version)
        if self.followed is not None and (self.followed[0].name, self.followed[0].version) == (name, version):
            log.warning("unloading %s v%d, the followed version: deltas are no longer applied until a newer "
                        "version of %s is loaded", name, version, name)
            self.stop_follower()
            self.followed = None
        vdir = self.repo / name / str(version)
        os.replace(vdir, self.retired / f"{name}-{version}-{time.time_ns()}")
        if versions:
            self._triton_load(name)  # Triton unloads the missing version once its in-flight requests finish
        else:
            self._unload_model(repository.RepositoryModelUnloadRequest(model_name=name), metadata=self._admin)
            shutil.rmtree(self.repo / name, ignore_errors=True)
        self.models = {**self.models, name: versions} if versions else {
            k: v for k, v in self.models.items() if k != name}
        # a once-followed version's private image: its draining workers keep their mappings (Linux frees the
        # pages with the last one); no follower writes it any more, so no new dense file is asked for
        remove_files(self._private_image_path(name, version))
        self._drop_image(removed)

    def specs(self) -> dict[str, dict[int, ModelSpec]]:
        """predict_proxy.Catalog: what the Predict proxy validates requests against."""
        return {name: {n: v.spec for n, v in vs.items()} for name, vs in self.models.items()}

    def infos(self) -> list[inference_pb2.ModelInfo]:
        out = []
        for _, vs in sorted(self.models.items()):
            for n, v in sorted(vs.items()):
                info = v.info(n == max(vs))
                info.applied_steps.update(self.applied_steps(v))
                out.append(info)
        return out

    async def publish_health(self) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if self.models and not self.stopping
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for svc in ("", MANAGEMENT_SERVICE):
            await self.health.set(svc, status)

    def workers(self) -> list[tuple[int, str, Path]]:
        """(pid, state, model.py) of every worker process tritonserver runs (its Python-backend stubs)."""
        out = []
        if self.proc is None:
            return out
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
                if int(ppid) != self.proc.pid:
                    continue
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            model_py = next((Path(a.decode()) for a in argv if a.endswith(b"/model.py")), None)
            if model_py is not None:
                out.append((int(d.name), state, model_py))
        return out

    def _replace_dead_workers(self) -> None:
        """Triton's Python backend does not restart a stub that died (requests routed to it fail with
        'Stub process is not healthy'); a changed model.py makes Triton's load build fresh instances of that
        version while the others keep serving, then retire the old ones. Runs under self.lock, so no load
        or unload is changing the worker set meanwhile."""
        live: dict[Path, int] = {}
        for _, state, model_py in self.workers():
            if state != "Z":  # a zombie until tritonserver reaps it (it may not)
                live[model_py] = live.get(model_py, 0) + 1
        for name, versions in self.models.items():
            for version in versions:
                model_py = self.repo / name / str(version) / "model.py"
                if live.get(model_py, 0) >= self.cfg.workers:
                    continue
                log.error("a worker of %s v%d died (%d of %d live); replacing it", name, version,
                          live.get(model_py, 0), self.cfg.workers)
                self.replaced += 1
                os.utime(model_py)
                self._triton_load(name)

    async def watch(self) -> None:
        """Replaces dead workers; restarts tritonserver if it dies (its workers die with it) and loads every
        model again."""
        while not self.stopping:
            await asyncio.sleep(0.5)
            try:
                await self._watch_follower()
            except Exception:  # never let a follower problem end the supervision of tritonserver and workers
                log.exception("restarting the delta follower failed; trying again")
            if self.proc is not None and self.proc.poll() is None and not self.stopping:
                async with self.lock:
                    try:
                        await asyncio.to_thread(self._replace_dead_workers)
                    except Refused as e:
                        log.error("replacing a dead worker failed: %s", e.message)
            if self.proc is not None and self.proc.poll() is not None and not self.stopping:
                log.error("tritonserver exited %s; restarting", self.proc.returncode)
                self.restarts += 1
                async with self.lock:
                    await self.publish_health()
                    await asyncio.to_thread(self._start_triton)
                    for name in list(self.models):
                        await asyncio.to_thread(self._triton_load, name)
                    await self.publish_health()

    async def drain(self) -> None:
        self.stopping = True
        await asyncio.to_thread(self.stop_follower)
        await self.health.enter_graceful_shutdown()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # Triton refuses new requests, answers those in flight
            try:
                await asyncio.to_thread(self.proc.wait, self.cfg.grace_s + 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ManagementServicer(inference_pb2_grpc.InferenceGatewayServicer):
    """The control plane on its own address; Predict / PredictStream are UNIMPLEMENTED here."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    async def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(models=self.sup.infos())

    async def LoadModel(self, request, context):
        try:
            path = load_path(request, self.sup.cfg.model_store)
            async with self.sup.lock:
                v = await asyncio.to_thread(self.sup.add, str(path), request.name, request.version)
                await self.sup.publish_health()
        except PathRefused as e:
            await context.abort(e.code, e.message)
        except OSError as e:
            refused = status_of_oserror(e, "path", request.path)
            await context.abort(refused.code, refused.message)
        except Refused as e:
            await context.abort(e.code, e.message)
        log.info("loaded model %s v%d in every worker", v.name, v.version)
        return v.info(v.version == max(self.sup.models[v.name]))

    async def UnloadModel(self, request, context):
        try:
            async with self.sup.lock:
                await asyncio.to_thread(self.sup.remove, request.name, request.version)
                await self.sup.publish_health()
        except Refused as e:
            await context.abort(e.code, e.message)
        log.info("unloaded model %s v%d from every worker", request.name, request.version)
        return inference_pb2.UnloadModelResponse()

    async def SetDefaultVersion(self, request, context):
        versions = self.sup.models.get(request.name, {})
        if request.version not in versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"version: model {request.name!r} has no version "
                                                           f"{request.version} loaded (loaded: {sorted(versions)})")
        if request.version != max(versions):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"version: unversioned requests go to the highest loaded version "
                                f"({max(versions)}); unload it to make {request.version} the default")
        return versions[request.version].info(True)


async def run(cfg: FrontendConfig, stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    dist = TritonDist.find()
    await asyncio.to_thread(dist.check_libraries)  # a missing library: one clear line, not a dead tritonserver
    if queue_policy(cfg)[0]:
        log.warning("a queue bound (--max-queue / --max-queue-wait-ms) turns off Triton's batch prefetch: a request "
                    "that arrives while every worker is busy can then wait up to 500 ms for the next arrival to wake "
                    "the batcher (Triton 2.51), most with --workers 1; refusals are UNAVAILABLE")
    sup = Supervisor(cfg, dist)
    await asyncio.to_thread(sup._start_triton)
    rejects = Rejects(CollectorRegistry(), log)  # the supervisor exports no metrics: counted for the log only
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if cfg.token:
        interceptors.append(AioControlPlaneAuth([TokenRule(cfg.token, full_names(MANAGEMENT_SERVICE, CONTROL_PLANE))],
                                                on_refusal=rejects.refused))
    interceptors.append(AioDecodeGuard(rejects))
    server = grpc.aio.server(interceptors=interceptors)
    inference_pb2_grpc.add_InferenceGatewayServicer_to_server(ManagementServicer(sup), server)
    health_pb2_grpc.add_HealthServicer_to_server(sup.health, server)
    reflection.enable_server_reflection((MANAGEMENT_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    management_port = bind(server, f"{cfg.host}:{cfg.management_port}", cfg.tls)
    await server.start()
    target = cfg.predict_target or f"{cfg.host}:{sup.port}"
    # a request is refused before forwarding when Triton would refuse it for its size
    from inference_gateway.predict_proxy import PredictProxy, add_to_server  # loads package `inference` (oip.py)

    proxy = PredictProxy(sup, target, Limits(max_request_samples=cfg.max_batch_size))
    predict_server, predict_port = add_to_server(proxy, cfg.host, cfg.predict_port, cfg.predict_token, cfg.tls)
    health_pb2_grpc.add_HealthServicer_to_server(sup.health, predict_server)
    await predict_server.start()
    try:
        for path in cfg.models:
            in_store = os.path.join(cfg.model_store, path)
            await asyncio.to_thread(sup.add, in_store if not os.path.isabs(path) and os.path.isdir(in_store) else path)
        await sup.publish_health()
        print(json.dumps({"event": "serving", "frontend": "tritonserver", "protocol": "kserve-v2-grpc",
                          "host": cfg.host, "port": sup.port, "management_port": management_port,
                          "predict_port": predict_port, "predict_target": target,
                          "predict_token": bool(cfg.predict_token),
                          "metrics_port": sup.metrics_port, "pid": os.getpid(), "triton_pid": sup.proc.pid,
                          "workers": cfg.workers, "allocator": sup.allocator or "glibc", "tls": cfg.tls is not None,
                          "mtls": bool(cfg.tls and cfg.tls.client_ca), "control_token": bool(cfg.token),
                          "follow": bool(cfg.follow), "follower_pid": sup.follower.pid if sup.follower else None,
                          "follower_metrics_port": sup.follower_metrics_port,
                          "models": [{"name": i.name, "version": i.version,
                                                               "table_bytes": i.table_bytes} for i in sup.infos()]}),
              flush=True)
        watcher = asyncio.ensure_future(sup.watch())
        await stop.wait()
        log.info("draining")
        sup.stopping = True
        await sup.health.enter_graceful_shutdown()
        await predict_server.stop(cfg.grace_s)  # forwarded requests are answered before tritonserver stops
        await sup.drain()
        watcher.cancel()
    finally:
        sup.stop_follower()
        if sup.proc is not None and sup.proc.poll() is None:
            sup.proc.kill()
        await predict_server.stop(1)
        await proxy.close()
        await server.stop(1)
    log.info("gateway stopped")
