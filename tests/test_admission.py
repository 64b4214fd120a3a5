"""Overload refused fast: a request whose expected queue wait is past --max-queue-wait-ms, or past its
own deadline, is answered RESOURCE_EXHAUSTED on arrival (Predict, PredictStream, ModelInfer), never
left to be cancelled after waiting; the requests admitted are all answered."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tritonclient
import yaml
from tritonclient.utils import InferenceServerException

from inference_gateway.admission import Admission, AdmissionConfig, BatchTime, Refused
from inference_gateway.client import GatewayClient, build_request
from inference_gateway.process import launch
from protos.model_config import ModelConfig
from tests import prom
from tests.test_oip import inputs
from trainer.data import SyntheticData
from trainer.export import ExportedModel, export_package, table_dtypes
from trainer.model import DenseDLRM

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 64  # per request; with the wide MLP below one request computes for several ms


@pytest.fixture(scope="module")
def slow_package(tmp_path_factory):
    """The tiny tables under a wide dense arch, so the batching queue, not gRPC, is the bottleneck."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["dense"]["bottom_mlp"] = [1024, 1024, 8]
    raw["dense"]["top_mlp"] = [1024, 1024, 1]
    cfg = ModelConfig.from_dict(raw)
    g = torch.Generator().manual_seed(0)
    model = ExportedModel(cfg, DenseDLRM(cfg), {t.name: torch.randn(t.num_rows, t.dim, generator=g)
                                                for t in cfg.tables}, step=0)
    root = tmp_path_factory.mktemp("slow")
    return cfg, export_package(model, root / "pkg", dtypes=table_dtypes(cfg, "int8", []))


def arrays(cfg: ModelConfig, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = SyntheticData(cfg, seed=1, pooling_factor=2).batch(i, SAMPLES)
    return b.dense.numpy(), b.sparse.lengths.numpy(), b.sparse.values.numpy()


def requests(cfg: ModelConfig, count: int) -> list:
    return [build_request(*arrays(cfg, i), request_id=str(i)) for i in range(count)]


def fire(client: GatewayClient, reqs: list) -> tuple[list, dict[int, float]]:
    """All requests at once (futures); returns them and each one's seconds from its send to its answer."""
    latency: dict[int, float] = {}
    futures = []
    for i, r in enumerate(reqs):
        sent = time.perf_counter()
        f = client.stub.Predict.future(r, timeout=120)
        f.add_done_callback(lambda _f, i=i, sent=sent: latency.__setitem__(i, time.perf_counter() - sent))
        futures.append(f)
    for f in futures:
        f.exception()
    return futures, latency


def test_expected_wait_is_the_compute_time_of_the_full_batches_queued_ahead():
    time_of = BatchTime(alpha=0.3)
    admission = Admission(AdmissionConfig(max_queue_wait_s=0.03))
    admission.check(10_000, time_of, 256, 2, 2, 0.001)  # nothing measured yet: admitted
    time_of.observe(100, 0.01)
    assert time_of.model() == pytest.approx((0.0, 0.0001, 0.01))  # sizes alike: proportional
    for _ in range(30):  # batches of 8 take 3 ms, of 64 take 10 ms: 2 ms fixed + 0.125 ms per sample
        time_of.observe(8, 0.003)
        time_of.observe(64, 0.010)
    fixed, per_sample, _ = time_of.model()
    assert fixed == pytest.approx(0.002, rel=1e-3) and per_sample == pytest.approx(0.000125, rel=1e-3)
    # 64 queued: the request joins their batch at once (workers idle) and computes 2 + 8 ms
    e = admission.expected(64, time_of, 256, 2, 0)
    assert e.wait_s == 0 and e.compute_s == pytest.approx(0.010, rel=1e-3)
    assert admission.expected(64, time_of, 256, 2, 2).wait_s > 0  # both workers busy: one must finish first
    # 600 queued: two full batches of 256 ahead, one per worker (34 ms), then its batch of 88 + 1 samples
    e = admission.expected(600, time_of, 256, 2, 0)
    assert e.wait_s == pytest.approx(0.034, rel=1e-3) and e.compute_s == pytest.approx(0.013, rel=1e-3)
    admission.check(64, time_of, 256, 2, 0, None)
    with pytest.raises(Refused) as r:
        admission.check(600, time_of, 256, 2, 0, None)
    assert r.value.reason == "max_queue_wait"
    assert r.value.message == ("overloaded: expected queue wait 34.0 ms (600 samples queued) exceeds "
                               "max_queue_wait_ms 30")
    with pytest.raises(Refused) as r:
        admission.check(64, time_of, 256, 2, 0, 0.005)  # 10 ms of compute, 5 ms left
    assert r.value.reason == "deadline"
    assert "queue wait 0.0 ms + compute 10.0 ms (64 samples queued) exceeds the request's remaining deadline " \
           "5.0 ms" in r.value.message
    admission.check(64, time_of, 256, 2, 0, 0.011)


def test_overload_is_refused_at_once_and_the_admitted_are_served(slow_package, tmp_path):
    cfg, pkg = slow_package
    gw = launch(["--model", str(pkg), "--workers", "1", "--max-batch-size", str(SAMPLES), "--max-wait-ms", "1",
                 "--max-queue", "1000000", "--max-queue-wait-ms", "100"], workdir=tmp_path / "gw")
    try:
        with GatewayClient(gw.address) as client:
            reqs = requests(cfg, 200)
            for r in reqs[:3]:  # the service rate is measured from here on
                client.predict_request(r)
            futures, latency = fire(client, reqs)
            ok = [i for i, f in enumerate(futures) if f.exception() is None]
            refused = [i for i, f in enumerate(futures) if f.exception() is not None]
            assert ok and refused, (len(ok), len(refused))
            assert {futures[i].code() for i in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            details = futures[refused[0]].details()
            assert "expected queue wait" in details and "exceeds max_queue_wait_ms 100" in details, details
            for i in ok:
                assert len(futures[i].result().scores.data) == 4 * SAMPLES
            # refused on arrival, not after waiting: far sooner than the admitted requests' wait
            refusal_p50 = float(np.median([latency[i] for i in refused]))
            assert refusal_p50 < 0.2, refusal_p50
            port = gw.metrics_port
            assert prom.value(port, "gateway_admission_refusals_total", reason="max_queue_wait") == len(refused)
            assert prom.value(port, "gateway_rejects_total", reason="deadline") == 0  # none waited past a deadline

            # PredictStream: each message is admitted or refused on its own, the stream goes on
            answers = list(client.stub.PredictStream(iter(reqs[:150]), timeout=120))
            codes = [a.error.code for a in answers]
            assert len(answers) == 150
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]) > 0 and codes.count(0) > 0
    finally:
        gw.kill()


def test_a_deadline_shorter_than_the_expected_wait_is_refused_at_once(slow_package, tmp_path):
    cfg, pkg = slow_package
    gw = launch(["--model", str(pkg), "--workers", "1", "--max-batch-size", str(SAMPLES), "--max-wait-ms", "1",
                 "--max-queue", "1000000"], workdir=tmp_path / "gw")  # no bound of its own: deadlines only
    try:
        with GatewayClient(gw.address) as client:
            reqs = requests(cfg, 150)
            for r in reqs[:3]:
                client.predict_request(r)
            backlog = [client.stub.Predict.future(r, timeout=120) for r in reqs]
            until = time.monotonic() + 60
            while prom.value(gw.metrics_port, "gateway_queue_samples") < 100 * SAMPLES and time.monotonic() < until:
                time.sleep(0.01)
            start = time.perf_counter()
            with pytest.raises(grpc.RpcError) as e:
                client.predict_request(reqs[0], timeout=0.3)
            elapsed = time.perf_counter() - start
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), e.value.details())
            assert "exceeds the request's remaining deadline" in e.value.details()
            assert elapsed < 0.3  # answered before its deadline, not cancelled at it
            # the same admission for the Open Inference Protocol (its stubs live in the gateway process only)
            triton = tritonclient.InferenceServerClient(url=gw.address)
            with pytest.raises(InferenceServerException) as e:
                triton.infer("dlrm", inputs(*arrays(cfg, 0)), client_timeout=0.3)
            triton.close()
            assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED", (e.value.status(), e.value.message())
            assert "remaining deadline" in e.value.message()
            assert all(f.exception() is None for f in backlog)  # every admitted request is answered
            assert prom.value(gw.metrics_port, "gateway_admission_refusals_total", reason="deadline") == 2
    finally:
        gw.kill()
