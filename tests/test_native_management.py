"""serve-native's management address as real processes: LoadModel / UnloadModel / SetDefaultVersion /
ListModels served by the supervisor with the control token, applied to every worker by rolling them
(new workers with the new model set, then the old ones retired after their batch in hand), under load
from several clients without one failed request; refusals name the field and change nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_gateway import proc_memory
from inference_gateway.allocator import Allocator, preload
from inference_gateway.client import GatewayClient, build_request, scores_of
from inference_gateway.model import ServingModel
from inference_gateway.native.supervisor import MANAGEMENT_THREADS, MAX_CONCURRENT_CHANGES
from inference_gateway.process import launch_native
from protos import inference_pb2, inference_pb2_grpc
from protos.package import load_package
from tests import prom
from tests.test_inference_package import two_versions
from tests.test_native_gateway import health, http2_settings, niceness
from tests.test_oip import ragged

WORKERS = 2
TOKEN = "s3cret-control-token"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return two_versions(tmp_path_factory.mktemp("store"))


# the supervisor itself is started under jemalloc, as a parent's LD_PRELOAD would have it
INHERITED = {**os.environ, "LD_PRELOAD": lib} if (lib := preload(Allocator.AUTO)) else None


@pytest.fixture(scope="module")
def gw(store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native-mgmt")
    (tmp / "control.token").write_text(TOKEN + "\n")
    g = launch_native(["--model", "v1", "--model-store", str(store), "--workers", str(WORKERS),
                       "--token-file", str(tmp / "control.token"), "--max-wait-ms", "1", "--allocator", "glibc",
                       "--frontend-scheduling", "normal", "--max-streams-per-connection", "0", "--worker-nice", "3"],
                      workdir=tmp / "gw", env=INHERITED)
    yield g
    g.kill()


def admin(g, token: str | None = TOKEN) -> GatewayClient:
    return GatewayClient(f"127.0.0.1:{g.announced['management_port']}", token=token)


def workers(g) -> set[int]:
    return {p for p in proc_memory.children(g.pid) if p != g.announced["frontend_pid"]}


def expected(store, version: int, req) -> np.ndarray:
    model = ServingModel(load_package(store / f"v{version}"))
    return model.scores(*(torch.from_numpy(a) for a in req)).numpy()


def test_allocator_glibc_preloads_nothing_even_when_the_supervisor_inherited_jemalloc(gw):
    assert INHERITED, "jemalloc is missing: run `make install` as root (it apt-gets libjemalloc2)"
    assert gw.announced["allocator"] == "glibc"
    for pid in (gw.announced["frontend_pid"], *workers(gw)):
        assert "libjemalloc" not in Path(f"/proc/{pid}/maps").read_text(), pid


def test_frontend_scheduling_normal_leaves_every_thread_on_sched_other(gw):
    """The default (dispatchers under SCHED_BATCH, tests/test_native_gateway.py) is a choice the operator can undo."""
    tasks = list(Path(f"/proc/{gw.announced['frontend_pid']}/task").iterdir())
    assert sum((t / "comm").read_text().strip() == "dispatcher" for t in tasks) == WORKERS
    assert {os.sched_getscheduler(int(t.name)) for t in tasks} == {os.SCHED_OTHER}


def test_max_streams_per_connection_0_leaves_grpcs_default(gw):
    """No bound of ours: grpc++ advertises none (a client may open as many streams as it likes)."""
    assert 3 not in http2_settings(gw.address)


def test_control_rpcs_need_the_token_and_refusals_change_nothing(gw, store):
    with admin(gw, token=None) as anon:
        assert [(m.name, m.version, m.is_default) for m in anon.list_models()] == [("dlrm", 1, True)]  # open
        for call in (lambda: anon.load_model("v2"), lambda: anon.unload_model("dlrm", 1),
                     lambda: anon.set_default_version("dlrm", 1)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
    with admin(gw, token="nope") as wrong, pytest.raises(grpc.RpcError) as e:
        wrong.load_model("v2")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "nope" not in e.value.details()
    before = workers(gw)
    with admin(gw) as a:
        cases = [(lambda: a.load_model("../outside"), grpc.StatusCode.INVALID_ARGUMENT, "path"),
                 (lambda: a.load_model(str(store.parent)), grpc.StatusCode.INVALID_ARGUMENT, "path"),
                 (lambda: a.load_model("no-such-package"), grpc.StatusCode.FAILED_PRECONDITION, "path: package"),
                 (lambda: a.load_model("v1"), grpc.StatusCode.ALREADY_EXISTS, "version"),
                 (lambda: a.unload_model("dlrm", 7), grpc.StatusCode.NOT_FOUND, "version"),
                 (lambda: a.unload_model("", 1), grpc.StatusCode.INVALID_ARGUMENT, "name"),
                 (lambda: a.set_default_version("other", 1), grpc.StatusCode.NOT_FOUND, "model")]
        for call, code, words in cases:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == code and words in e.value.details(), (code, e.value.code(), e.value.details())
        assert [(m.name, m.version, m.is_default) for m in a.list_models()] == [("dlrm", 1, True)]
        with pytest.raises(grpc.RpcError) as e:  # inference is not served on the management address
            a.predict_request(build_request(*ragged(1, 1)))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert workers(gw) == before  # a refused change rolled nothing
    with grpc.insecure_channel(f"127.0.0.1:{gw.announced['management_port']}") as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_hot_swap_in_every_worker_fails_no_request(gw, store):
    """Clients send unversioned requests and requests for v1 throughout LoadModel(v2), SetDefaultVersion(2)
    and (once the v1 clients stop) UnloadModel(1); every request is answered OK with the scores of the
    version it names in its answer, and after each call returns every worker serves the new set."""
    stop, stop_v1 = threading.Event(), threading.Event()
    answers: list[tuple[int, int, int]] = []  # (seed, version asked, version answered)
    failures: list[str] = []
    reqs = {k: ragged(1 + k % 2, 1000 + k) for k in range(16)}

    def drive(k: int, version: int) -> None:
        s = inference_pb2_grpc.InferenceGatewayStub(grpc.insecure_channel(gw.address))
        i = 0
        while not (stop.is_set() or (version and stop_v1.is_set())):
            seed = (k * 7 + i) % len(reqs)
            try:
                a = s.Predict(build_request(*reqs[seed], version=version), timeout=30)
                answers.append((seed, version, a.version))
                np.testing.assert_allclose(scores_of(a), want[a.version][seed], rtol=1e-5, atol=1e-6)
            except grpc.RpcError as e:
                failures.append(f"v{version}: {e.code().name}: {e.details()}")
            except AssertionError as e:
                failures.append(f"v{version} scores: {e}")
            i += 1

    want = {v: {k: expected(store, v, r) for k, r in reqs.items()} for v in (1, 2)}
    threads = [threading.Thread(target=drive, args=(k, version)) for k, version in enumerate((0, 0, 0, 1))]
    first = workers(gw)
    with admin(gw) as a:
        try:
            for t in threads:
                t.start()
            time.sleep(1.0)
            info = a.load_model("v2")
            assert (info.name, info.version, info.is_default) == ("dlrm", 2, False)
            loaded = workers(gw)
            assert len(loaded) == WORKERS and not loaded & first  # every worker was replaced
            s = inference_pb2_grpc.InferenceGatewayStub(grpc.insecure_channel(gw.address))
            for _ in range(8):  # v2 is in every worker now, by name; unversioned requests still go to v1
                assert s.Predict(build_request(*reqs[0], version=2), timeout=30).version == 2
                assert s.Predict(build_request(*reqs[0]), timeout=30).version == 1
            time.sleep(0.5)
            assert a.set_default_version("dlrm", 2).is_default
            for _ in range(8):
                assert s.Predict(build_request(*reqs[0]), timeout=30).version == 2
            with pytest.raises(grpc.RpcError) as e:  # v2 is the default of a model with another version
                a.unload_model("dlrm", 2)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "default" in e.value.details()
            time.sleep(0.5)
            stop_v1.set()
            threads[-1].join()
            a.unload_model("dlrm", 1)
            time.sleep(0.5)
            assert [(m.name, m.version, m.is_default) for m in a.list_models()] == [("dlrm", 2, True)]
            with pytest.raises(grpc.RpcError) as e:
                s.Predict(build_request(*reqs[0], version=1), timeout=30)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no version 1" in e.value.details()
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert not failures, failures[:5]
    unversioned = [answered for _, asked, answered in answers if asked == 0]
    assert unversioned[0] == 1 and unversioned[-1] == 2 and unversioned.index(2) > 10  # load across the swaps
    assert {answered for _, asked, answered in answers if asked == 1} == {1}
    assert len(workers(gw)) == WORKERS  # the retired workers exited
    assert prom.value(gw.announced["metrics_port"], "gateway_model_changes_total") == 3
    assert prom.value(gw.announced["metrics_port"], "gateway_models_loaded") == 1
    out = (gw.workdir / "stdout.log").read_text()
    assert out.count('"event": "models_changed"') == 3 and '"worker_replaced"' not in out
    time.sleep(1.2)  # the frontend's counters reach the supervisor once a second
    assert prom.value(gw.announced["metrics_port"], "gateway_requests_total", method="Predict", code="OK") >= \
        len(answers)


def images(g) -> set[str]:
    return {p.name for p in (g.workdir / "native" / "tables").glob("*.tbe")}


def test_load_under_another_name_and_make_default(gw, store):
    """...and the unloaded version's table image is deleted, the served one's kept."""
    before = images(gw)
    with admin(gw) as a:
        info = a.load_model("v1", name="ranker", version=5, make_default=True)
        [added] = images(gw) - before
        assert added.startswith("ranker-v5-")
        assert (info.name, info.version, info.is_default) == ("ranker", 5, True)
        s = inference_pb2_grpc.InferenceGatewayStub(grpc.insecure_channel(gw.address))
        req = ragged(2, 9)
        r = s.Predict(build_request(*req, model="ranker"), timeout=30)
        assert (r.model, r.version) == ("ranker", 5)
        np.testing.assert_allclose(scores_of(r), expected(store, 1, req), rtol=1e-5, atol=1e-6)
        assert s.Predict(build_request(*req), timeout=30).model == "dlrm"  # the first model stays the default
        a.unload_model("ranker", 5)
        listed = a.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=30).models
        assert [(m.name, m.version) for m in listed] == [("dlrm", 2)]
        assert images(gw) == before and len(before) == 1 and next(iter(before)).startswith("dlrm-v2-")
        assert s.Predict(build_request(*req), timeout=30).version == 2  # new workers map the kept image


def test_list_models_shows_a_version_only_once_the_workers_serve_it(gw):
    """ListModels polled while LoadModel rolls the workers: whenever it lists the new version, a Predict naming
    that version is answered (the table changes before the new workers start; the listing waits for them)."""
    seen, checked = [], []
    with admin(gw) as a:
        loading = threading.Thread(target=a.load_model, args=("v1",), kwargs={"name": "listed", "version": 7})
        loading.start()
        s = inference_pb2_grpc.InferenceGatewayStub(grpc.insecure_channel(gw.address))
        deadline = time.monotonic() + 120
        while (loading.is_alive() or not checked) and time.monotonic() < deadline:
            listed = {(m.name, m.version) for m in a.list_models()}
            seen.append(listed)
            if ("listed", 7) in listed:
                r = s.Predict(build_request(*ragged(1, 3), model="listed", version=7), timeout=30)
                checked.append((r.model, r.version))
        loading.join()
        a.unload_model("listed", 7)
    assert ("listed", 7) not in seen[0] and set(checked) == {("listed", 7)} and len(seen) > 5


def test_health_is_serving_only_while_a_model_is_loaded(gw):
    """What the Kubernetes readiness probe asks: the management address's health follows the model set."""
    def status() -> int:
        return health(gw, "recsys.v1.InferenceGateway", gw.announced["management_port"])

    assert status() == health_pb2.HealthCheckResponse.SERVING
    with admin(gw) as a:
        for m in sorted(a.list_models(), key=lambda m: m.is_default):  # each model's default last
            a.unload_model(m.name, m.version)
        assert a.list_models() == [] and status() == health_pb2.HealthCheckResponse.NOT_SERVING
        a.load_model("v1")
        assert status() == health_pb2.HealthCheckResponse.SERVING


def _writer_when_read(fifo: Path, timeout: float) -> int:
    """The write end of `fifo` once a reader has it open (a prepare's child reading the manifest)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_changes_past_the_limit_are_refused_at_once_and_health_keeps_answering(gw, store):
    """A LoadModel holds a management thread while its package is read. Loads that hang (each package's
    manifest a FIFO nobody writes yet), one more than the server has threads: past MAX_CONCURRENT_CHANGES
    they and a SetDefaultVersion are refused RESOURCE_EXHAUSTED at once, changing nothing, while health (the
    readiness probe, 1 s) and ListModels keep answering; released, the held loads are refused as corrupt."""
    fifos = []
    for i in range(MANAGEMENT_THREADS + 1):
        (store / f"stuck{i}").mkdir()
        os.mkfifo(store / f"stuck{i}" / "manifest.json")
        fifos.append(store / f"stuck{i}" / "manifest.json")
    results: dict[int, tuple[grpc.StatusCode, str]] = {}

    def load(i: int) -> None:
        with admin(gw) as a:
            try:
                a.load_model(f"stuck{i}")
                results[i] = (grpc.StatusCode.OK, "")
            except grpc.RpcError as e:
                results[i] = (e.code(), e.details())

    released: set[int] = set()

    def release(i: int, timeout: float) -> None:  # junk for a held load's manifest: it ends FAILED_PRECONDITION
        fd = _writer_when_read(fifos[i], timeout)
        os.write(fd, b"not a manifest")
        os.close(fd)
        released.add(i)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(fifos))]
    try:
        with admin(gw) as a, grpc.insecure_channel(f"127.0.0.1:{gw.announced['management_port']}") as ch:
            grpc.channel_ready_future(ch).result(timeout=10)  # the 1 s below is the check's alone
            before = sorted((m.name, m.version, m.is_default) for m in a.list_models())
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while len(results) < len(fifos) - MAX_CONCURRENT_CHANGES and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = dict(results)
            assert len(refused) == len(fifos) - MAX_CONCURRENT_CHANGES, results
            assert all(c == grpc.StatusCode.RESOURCE_EXHAUSTED and "in progress" in msg for c, msg in refused.values())
            with pytest.raises(grpc.RpcError) as e:
                a.set_default_version(*before[0][:2])
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for _ in range(5):  # the held loads still hang: every answer below came from the free threads
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                assert status == health_pb2.HealthCheckResponse.SERVING
                assert sorted((m.name, m.version, m.is_default) for m in a.list_models()) == before
            assert len(results) == len(refused)
            held = set(range(len(fifos))) - set(refused)
            for i in held:
                release(i, 120)
            for t in threads:
                t.join(120)
            assert all(results[i][0] == grpc.StatusCode.FAILED_PRECONDITION and "corrupt" in results[i][1]
                       for i in held), results
            assert sorted((m.name, m.version, m.is_default) for m in a.list_models()) == before
    finally:  # a failure above must not leave prepare children blocked on a FIFO for good
        for i in set(range(len(fifos))) - released:
            with contextlib.suppress(OSError):  # no reader: that load was refused, its prepare never started
                release(i, 30 if threads[i].is_alive() else 0)
        for t in threads:
            if t.is_alive():
                t.join(30)


def test_worker_nice_holds_for_every_worker_the_changes_above_started(gw):
    """--worker-nice 3: every thread of every worker at niceness 3, those started by the loads and swaps of the
    tests above too (run alone, the first ones), and the frontend's at 0."""
    pids = workers(gw)
    assert len(pids) == WORKERS
    for pid in pids:
        assert niceness(pid) == {3}, pid
    assert niceness(gw.announced["frontend_pid"]) == {0}
