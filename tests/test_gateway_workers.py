"""`inference-gateway serve-triton` as real processes: tritonserver's frontend over N supervised Python
workers. Workers answer what the package computes in-process; they share one copy of the tables; a
worker killed with SIGKILL is replaced while the gateway stays ready; a hot swap through the
management address under load fails no request; SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tritonclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.gateway_frontend import model_infer_pool
from inference_gateway import proc_memory
from inference_gateway.allocator import Allocator, AllocatorMissing, preload, with_preload
from inference_gateway.client import GatewayClient, build_request, scores_of
from inference_gateway.loadgen import OIP_METHOD, closed_loop
from inference_gateway.model import ServingModel
from inference_gateway.process import launch, launch_triton
from inference_gateway.shared_tables import IMAGE_SUFFIX
from protos import inference_pb2, inference_pb2_grpc
from protos.package import load_package
from tests.test_inference_package import TINY, two_versions
from tests.test_oip import bags_inputs, batched_inputs, ids_inputs, ragged

WORKERS = 2
NFEAT, NDENSE = len(TINY.features), TINY.dense_features


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return two_versions(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def gw(store, tmp_path_factory):
    g = launch_triton(["--model", str(store / "v1"), "--workers", str(WORKERS), "--model-store", str(store),
                       "--max-wait-ms", "1", "--grace-s", "20"], workdir=tmp_path_factory.mktemp("gw"))
    yield g
    g.kill()
    with contextlib.suppress(ProcessLookupError):
        os.kill(g.announced["triton_pid"], signal.SIGKILL)


def sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n samples with bags of 0..4 ids (Predict's feature-major lengths and values)."""
    return ragged(n, seed)


def infer(client, dense: np.ndarray, lengths: np.ndarray, values: np.ndarray, version: str = ""):
    return client.infer("dlrm", batched_inputs(dense, lengths, values), model_version=version, client_timeout=60)


def live_workers(g) -> list[int]:
    return proc_memory.children(g.announced["triton_pid"])


def test_workers_answer_what_serve_answers_for_the_same_package(gw, store, tmp_path):
    client = tritonclient.InferenceServerClient(gw.address)
    assert client.is_server_ready() and client.is_model_ready("dlrm")
    assert len(live_workers(gw)) == WORKERS
    meta = client.get_model_metadata("dlrm")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("dense", "FP32", [-1, NDENSE]), ("ids", "INT64", [-1, NFEAT]), ("lengths", "INT64", [-1, NFEAT]),
        ("values", "INT64", [-1, -1])] + [
        (f"{f.name}.{part}", "INT64", shape) for f in TINY.features
        for part, shape in (("lengths", [-1, 1]), ("values", [-1, -1]))]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("scores", "FP32", [-1, 1])]
    serve = launch(["--model", str(store / "v1")], workdir=tmp_path / "serve")
    other = tritonclient.InferenceServerClient(serve.address)
    try:
        dense, lengths, values = sample(7, 0)
        got = infer(client, dense, lengths, values).as_numpy("scores")
        want = infer(other, dense, lengths, values).as_numpy("scores")  # the same client call on `serve`
        assert got.shape == want.shape == (7, 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        model = ServingModel(load_package(store / "v1"))
        inproc = model.scores(*(torch.from_numpy(a) for a in (dense, lengths, values))).numpy()
        np.testing.assert_allclose(got.ravel(), inproc, rtol=1e-5, atol=1e-6)
        # requests of different bag widths merge in one batch (ragged) and keep their own scores
        many = [sample(1 + k % 3, 100 + k) for k in range(12)]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda s: infer(client, *s).as_numpy("scores"), many))
        for s, a in zip(many, answers, strict=True):
            np.testing.assert_allclose(a, infer(other, *s).as_numpy("scores"), rtol=1e-5, atol=1e-5)
        # bad values get serve's own message on both servers (Triton checks names, types and ranks first)
        bad_cases = {"out of range": (dense, lengths, np.where(values == values[0], 10**6, values)),
                     "NaN": (np.where(np.arange(dense.size).reshape(dense.shape) == 5, np.nan, dense)
                             .astype(np.float32), lengths, values)}
        for name, case in bad_cases.items():
            messages = []
            for c in (client, other):
                with pytest.raises(tritonclient.InferenceServerException) as e:
                    infer(c, *case)
                assert e.value.status() == "StatusCode.INVALID_ARGUMENT", (name, e.value.message())
                messages.append(e.value.message().split("] ", 1)[-1])
            assert messages[0] == messages[1], (name, messages)
        rows = [next(t.num_rows for t in TINY.tables if t.name == f.table) for f in TINY.features]
        ids = np.stack([np.random.default_rng(3).integers(0, r, 7) for r in rows], axis=1)  # single-hot
        one = np.ones(NFEAT * 7, dtype=np.int64)
        got = client.infer("dlrm", ids_inputs(dense, ids)).as_numpy("scores")
        np.testing.assert_allclose(got, other.infer("dlrm", ids_inputs(dense, ids)).as_numpy("scores"), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(got, infer(client, dense, one, ids.T.ravel()).as_numpy("scores"), rtol=1e-5,
                                   atol=1e-5)  # the per-feature form of the same samples
        # the compact multi-hot form (what the Predict proxy forwards): the per-feature form's scores
        compact = client.infer("dlrm", bags_inputs(dense, lengths, values)).as_numpy("scores")
        np.testing.assert_allclose(compact, infer(client, dense, lengths, values).as_numpy("scores"), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(compact, other.infer("dlrm", bags_inputs(dense, lengths, values)).as_numpy("scores"),
                                   rtol=1e-5, atol=1e-5)
        full = batched_inputs(dense, lengths, values)
        short = bags_inputs(dense, lengths, values)
        short[2] = tritonclient.InferInput("values", [7, 1], "INT64")
        short[2].set_data_from_numpy(np.zeros((7, 1), dtype=np.int64))
        for name, tensors in {"missing": full[:-1], "both": [*ids_inputs(dense, ids), *full[1:3]],
                              "compact too short": short,
                              "ids width": ids_inputs(dense, ids[:, :2].copy())}.items():
            messages = []
            for c in (client, other):
                with pytest.raises(tritonclient.InferenceServerException) as e:
                    c.infer("dlrm", tensors)
                assert e.value.status() == "StatusCode.INVALID_ARGUMENT", (name, e.value.message())
                messages.append(e.value.message().split("] ", 1)[-1])
            if name != "ids width":  # Triton checks the shape of a declared input itself
                assert messages[0] == messages[1], (name, messages)
        first = f"{TINY.features[0].name}.lengths"
        for entry, text in ((50, f"{first}: entry 50 at sample 0 exceeds the"), (-1, f"{first}: negative entry")):
            tensors = batched_inputs(dense, lengths, values)
            tensors[1] = tritonclient.InferInput(first, [7, 1], "INT64")
            tensors[1].set_data_from_numpy(np.full((7, 1), entry, dtype=np.int64))
            for c in (client, other):
                with pytest.raises(tritonclient.InferenceServerException) as e:
                    c.infer("dlrm", tensors)
                assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and text in e.value.message()
        with pytest.raises(tritonclient.InferenceServerException) as e:  # Triton's own shape check
            infer(client, dense[:, :2].copy(), lengths, values)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "'dense'" in e.value.message()
        assert infer(client, dense, lengths, values).as_numpy("scores").shape == (7, 1)  # still serving
    finally:
        other.close()
        serve.kill()


def test_workers_share_one_copy_of_the_tables(gw):
    pids = live_workers(gw)
    maps = [proc_memory.mapped(p, IMAGE_SUFFIX) for p in pids]
    size = next((gw.workdir / "triton" / "tables").glob(f"*{IMAGE_SUFFIX}")).stat().st_size
    pages = -(-size // 4096) * 4096
    assert all(m["rss"] == pages for m in maps), maps  # every worker maps all of it (MAP_POPULATE) ...
    assert sum(m["pss"] for m in maps) <= pages * 1.1, maps  # ... and the page cache holds it once
    whole = proc_memory.total(gw.pid)
    assert whole["processes"] >= 2 + WORKERS and whole["pss"] < whole["rss"]
    supervisor = proc_memory.rollup(gw.pid)  # verifying packages and writing images ran in a child
    assert supervisor["rss"] < min(proc_memory.rollup(p)["rss"] for p in pids) / 2, (supervisor, pids)


def test_tritonserver_and_its_workers_run_on_jemalloc_when_the_system_has_it(gw):
    """--allocator auto: jemalloc preloaded into tritonserver and every worker when installed; the pool of
    reusable request objects sized to the queue bound (both cut Triton's malloc work per request)."""
    expected = ctypes.util.find_library("jemalloc")
    assert gw.announced["allocator"] == (expected or "glibc")
    for pid in (gw.announced["triton_pid"], *live_workers(gw)):
        mapped = "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()
        assert mapped == (expected is not None), (pid, expected)
    argv = Path(f"/proc/{gw.announced['triton_pid']}/cmdline").read_bytes().split(b"\0")
    assert b"--grpc-infer-allocation-pool-size=1024" in argv  # no queue bound: the cap


def test_allocator_jemalloc_is_refused_with_what_to_install_when_missing(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert preload(Allocator.AUTO) is None and preload(Allocator.GLIBC) is None
    with pytest.raises(AllocatorMissing, match=r"allocator: jemalloc not found .*libjemalloc2"):
        preload(Allocator.JEMALLOC)


def test_a_child_gets_one_malloc_whatever_its_parent_preloaded():
    inherited = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2:/opt/libtrace.so libtcmalloc_minimal.so.4"}
    assert with_preload(dict(inherited), None) == {"LD_PRELOAD": "/opt/libtrace.so"}  # glibc: theirs dropped
    assert with_preload(dict(inherited), "libjemalloc.so.2") == {"LD_PRELOAD": "libjemalloc.so.2 /opt/libtrace.so"}
    assert with_preload({"LD_PRELOAD": "libjemalloc.so.2", "A": "1"}, None) == {"A": "1"}
    assert with_preload({}, None) == {} and with_preload({}, "libjemalloc.so.2") == {"LD_PRELOAD": "libjemalloc.so.2"}


def _predict_stub(g) -> inference_pb2_grpc.InferenceGatewayStub:
    return inference_pb2_grpc.InferenceGatewayStub(grpc.insecure_channel(f"127.0.0.1:{g.announced['predict_port']}"))


def test_predict_port_checks_as_serve_and_keeps_management_apart(gw):
    """The project's API on --predict-port: ListModels, serve's errors for bad input (before forwarding);
    management methods only on the management port, Predict only on the predict port."""
    stub = _predict_stub(gw)
    assert [(m.name, m.version, m.is_default) for m in stub.ListModels(inference_pb2.ListModelsRequest(),
                                                                         timeout=30).models] == [("dlrm", 1, True)]
    dense, lengths, values = sample(3, 1)
    for req, code, text in (
            (build_request(dense[:, :2], lengths, values), "INVALID_ARGUMENT", f"dense: width 2, model dlrm v1 "
                                                                               f"takes {NDENSE}"),
            (build_request(dense, lengths[1:], values), "INVALID_ARGUMENT", "lengths: "),
            (build_request(dense, lengths, values, model="x"), "NOT_FOUND", "model: 'x' is not loaded"),
            (build_request(dense, lengths, values, version=7), "NOT_FOUND", "version: model 'dlrm' has no "
                                                                            "version 7")):
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(req, timeout=30)
        assert e.value.code().name == code and e.value.details().startswith(text), e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.LoadModel(inference_pb2.LoadModelRequest(path="v2"), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(f"127.0.0.1:{gw.announced['management_port']}") as ch, pytest.raises(grpc.RpcError) as e:
        inference_pb2_grpc.InferenceGatewayStub(ch).Predict(build_request(dense, lengths, values), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_predict_through_the_proxy_scores_what_the_package_computes(gw, store):
    """Single-hot requests are forwarded as dense + ids, multi-hot ones per feature: both score as the package."""
    model = ServingModel(load_package(store / "v1"))
    stub = _predict_stub(gw)
    rng = np.random.default_rng(2)
    ids = np.stack([rng.integers(0, r, 4) for r in model.rows_per_feature])  # [F, B]
    single = (rng.random((4, NDENSE), dtype=np.float32), np.ones(NFEAT * 4, dtype=np.int64), ids.ravel())
    for dense, lengths, values in (single, sample(4, 2)):
        resp = stub.Predict(build_request(dense, lengths, values), timeout=60)
        want = model.scores(torch.from_numpy(dense), torch.from_numpy(lengths), torch.from_numpy(values)).numpy()
        np.testing.assert_allclose(scores_of(resp), want, rtol=1e-5, atol=1e-6)


def _management_health(g) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{g.announced['management_port']}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_a_killed_worker_is_replaced_and_the_gateway_stays_ready(gw):
    client = tritonclient.InferenceServerClient(gw.address)
    before = live_workers(gw)
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert client.is_server_ready() and client.is_model_ready("dlrm")
        assert _management_health(gw) == health_pb2.HealthCheckResponse.SERVING
        now = live_workers(gw)
        if before[0] not in now and len(now) == WORKERS and set(now) != set(before) - {before[0]}:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"worker not replaced: {before} -> {live_workers(gw)}\n{gw.log_tail()}")
    for seed in range(2 * WORKERS):  # every worker answers again
        assert infer(client, *sample(2, seed)).as_numpy("scores").shape == (2, 1)
    assert "died (1 of 2 live); replacing it" in gw.log_tail(chars=1 << 20)


def test_hot_swap_through_the_management_address_fails_no_request(gw):
    stop = threading.Event()
    versions: list[str] = []
    failures: list[str] = []

    def drive(k: int) -> None:
        client = tritonclient.InferenceServerClient(gw.address)
        i = 0
        while not stop.is_set():
            try:
                versions.append(infer(client, *sample(1, k * 100000 + i)).get_response().model_version)
            except tritonclient.InferenceServerException as e:
                failures.append(f"{e.status()}: {e.message()}")
            i += 1

    threads = [threading.Thread(target=drive, args=(k,)) for k in range(4)]
    with GatewayClient(f"127.0.0.1:{gw.announced['management_port']}") as admin:
        try:
            for t in threads:
                t.start()
            time.sleep(1.0)
            info = admin.load_model("v2")
            assert (info.name, info.version, info.is_default) == ("dlrm", 2, True)
            with pytest.raises(grpc.RpcError) as e:
                admin.set_default_version("dlrm", 1)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # the highest version is the default
            time.sleep(1.0)
            admin.unload_model("dlrm", 1)
            time.sleep(1.0)
            listed = [(m.name, m.version, m.is_default) for m in admin.list_models()]
            with pytest.raises(grpc.RpcError) as e:
                admin.load_model("../outside")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must not contain '..'" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                admin.load_model("no-such-package")
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "path: package refused:" in e.value.details() and "not a package directory" in e.value.details()
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert not failures, failures[:3]
    assert listed == [("dlrm", 2, True)]
    assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
    assert versions.index("2") > 10  # load really ran across the swap
    deadline = time.monotonic() + 180  # retired workers exit once their in-flight requests are answered
    while len(live_workers(gw)) != WORKERS and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(live_workers(gw)) == WORKERS  # v1's workers are gone, v2's serve


def test_sigterm_drains_and_exits_zero(gw):
    client = tritonclient.InferenceServerClient(gw.address)
    results: list[object] = []

    def one(seed: int) -> None:
        try:
            results.append(infer(client, *sample(64, seed)).as_numpy("scores").shape)
        except tritonclient.InferenceServerException as e:
            results.append(e.status())

    threads = [threading.Thread(target=one, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    workers = live_workers(gw)
    assert gw.terminate(timeout=120) == 0
    for t in threads:
        t.join()
    # a request that reached Triton before SIGTERM is answered; one that did not is refused, never lost
    assert all(r == (64, 1) or r == "StatusCode.UNAVAILABLE" for r in results), results
    assert results.count((64, 1)) >= 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(p) for p in (gw.announced["triton_pid"], *workers)):
        time.sleep(0.2)
    assert not [p for p in (gw.announced["triton_pid"], *workers) if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_without_a_queue_bound_one_worker_holds_no_request_half_a_second(store, tmp_path):
    """The default: no queue policy, so Triton's batcher prefetches batches for the busy worker. With a bound
    it instead waits for a free worker on a wakeup that a worker going idle never sends (Triton 2.51): a
    request arriving while the one worker is busy waited for the next arrival or 500 ms (h2load, 64
    streams, Criteo: 732 req/s, maximum 510 ms; unbounded 3,842 req/s, maximum 44 ms. This load with
    --max-queue 64: 3,243 req/s, p99 503 ms; without: 4,965 req/s, p99.9 30 ms). Unbounded, a lost wakeup
    (a race, not this) still stalls all 64 in flight for 500 ms about once in 150k requests."""
    g = launch_triton(["--model", str(store / "v1"), "--workers", "1", "--max-wait-ms", "1"],
                      workdir=tmp_path / "gw")
    try:
        config = (g.workdir / "triton" / "repository" / "dlrm" / "config.pbtxt").read_text()
        assert "default_queue_policy" not in config
        pool = model_infer_pool(TINY, "dlrm", 64)  # single-hot `ids` form
        r = asyncio.run(closed_loop(g.address, pool, 64, 3.0, 1, OIP_METHOD))
        assert not r["errors"] and r["ok"] > 500, r
        assert r["p99_ms"] < 400, r  # a bound stalls over 1% of requests; one race stall, < 1%
    finally:
        g.terminate()


def test_a_flood_past_the_queue_bound_is_refused_at_arrival(store, tmp_path):
    """--max-queue-wait-ms 2 at 1 ms per sample and one worker: Triton's queue holds 2 requests. A flood
    of 32 concurrent clients: those that find it full are refused at once (UNAVAILABLE, "Exceeds maximum
    queue size": Triton has no RESOURCE_EXHAUSTED), the others are answered with their scores."""
    g = launch_triton(["--model", str(store / "v1"), "--workers", "1", "--max-batch-size", "8", "--max-wait-ms", "1",
                       "--max-queue-wait-ms", "2", "--sample-cost-us", "1000"], workdir=tmp_path / "gw")
    try:
        config = (g.workdir / "triton" / "repository" / "dlrm" / "config.pbtxt").read_text()
        assert "max_queue_size: 2 timeout_action: REJECT default_timeout_microseconds: 2000" in config
        client = tritonclient.InferenceServerClient(g.address)
        ok: list[float] = []
        refused: dict[str, list[float]] = {}
        wrong: list[str] = []
        lock = threading.Lock()

        def drive(k: int) -> None:
            for i in range(12):
                s = sample(8, k * 100 + i)
                t0 = time.perf_counter()
                try:
                    scores = infer(client, *s).as_numpy("scores")
                    with lock:
                        ok.append(time.perf_counter() - t0)
                    if scores.shape != (8, 1):
                        wrong.append(str(scores.shape))
                except tritonclient.InferenceServerException as e:
                    took = time.perf_counter() - t0
                    with lock:
                        refused.setdefault(f"{e.status()}: {e.message().split('] ', 1)[-1]}", []).append(took)

        threads = [threading.Thread(target=drive, args=(k,)) for k in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        summary = {k: len(v) for k, v in refused.items()}
        full = refused.get("StatusCode.UNAVAILABLE: Exceeds maximum queue size", [])
        assert not wrong and ok and full, (len(ok), summary)
        assert set(refused) <= {"StatusCode.UNAVAILABLE: Exceeds maximum queue size",
                                "StatusCode.UNAVAILABLE: Request timeout expired"}, summary
        # most refusals come on arrival (a full queue), not after waiting in it (the queue timeout's backstop);
        # how fast each comes is measured by benchmarks.gateway_frontend (a GIL-bound client cannot time it)
        timed_out = refused.get("StatusCode.UNAVAILABLE: Request timeout expired", [])
        assert len(full) > len(timed_out), summary
        # serving after the flood. One lone request may still time out in the queue: with a bound and one worker,
        # Triton's batcher can hold it up to 500 ms, far past this 2 ms bound (gateway_frontend.md, "No queue bound
        # by default"), so the server gets a few tries
        answered = []
        for _ in range(10):
            try:
                answered.append(infer(client, *sample(3, 1)).as_numpy("scores").shape)
                break
            except tritonclient.InferenceServerException as e:
                assert "Request timeout expired" in e.message(), e.message()
                time.sleep(0.2)
        assert answered == [(3, 1)]
        client.close()
    finally:
        g.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(g.announced["triton_pid"], signal.SIGKILL)
