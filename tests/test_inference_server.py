"""The gateway as a real process on loopback: predictions, batching, bad input, limits, model
management with hot swap under load, health, reflection, metrics, access logs, SIGTERM."""

from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inference_gateway.cli import main as gateway_main
from inference_gateway.client import GatewayClient, build_request, scores_of
from inference_gateway.model import ServingModel
from inference_gateway.process import launch
from protos import common_pb2
from protos.package import load_package
from tests import prom
from tests.test_inference_package import TINY, tiny_model
from trainer.data import SyntheticData
from trainer.export import export_package, table_dtypes

FEATURES = [f.name for f in TINY.features]


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gw-pkgs")
    out = {
        "v1": export_package(tiny_model(0), root / "v1", dtypes=table_dtypes(TINY, "int8", []), version=1),
        "v2": export_package(tiny_model(1), root / "v2", dtypes=table_dtypes(TINY, "fp32", []), version=2),
        "zero": export_package(tiny_model(0), root / "zero", dtypes=table_dtypes(TINY, "int8", []), name="zeroed",
                               out_of_range="zero"),
    }
    return out


@pytest.fixture(scope="module")
def gateway(pkgs, tmp_path_factory):
    gw = launch(["--model", str(pkgs["v1"]), "--model", str(pkgs["zero"]), "--access-log", "--max-request-samples",
                 "512"], workdir=tmp_path_factory.mktemp("gw"))
    client = GatewayClient(gw.address)
    yield gw, client
    client.close()
    gw.kill()


def batch(n: int, seed: int = 0, index: int = 0):
    b = SyntheticData(TINY, seed=seed, pooling_factor=2).batch(index, n)
    return b.dense.numpy(), b.sparse.lengths.numpy(), b.sparse.values.numpy()


def test_predict_equals_the_package_in_process(gateway, pkgs):
    _, client = gateway
    dense, lengths, values = batch(64)
    served = client.predict(dense, lengths, values)
    ref = ServingModel(load_package(pkgs["v1"]))
    import torch

    expected = ref.scores(torch.from_numpy(dense), torch.from_numpy(lengths), torch.from_numpy(values)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-6)
    # named features in another order give the same scores
    order = [2, 0, 4, 1, 3]
    lv = lengths.reshape(5, 64)
    seg = np.split(values, np.cumsum(lv.sum(1))[:-1])
    shuffled = client.predict(dense, lv[order].ravel(), np.concatenate([seg[i] for i in order]),
                              features=[FEATURES[i] for i in order])
    np.testing.assert_allclose(shuffled, served, atol=1e-6)


def test_concurrent_requests_are_merged_and_split_back(gateway):
    gw, client = gateway
    before_batches = prom.value(gw.metrics_port, "gateway_batch_requests_count")
    reqs = [batch(1 + i % 3, index=i) for i in range(48)]
    futures = [client.stub.Predict.future(build_request(*r, request_id=f"r{i}"), timeout=30)
               for i, r in enumerate(reqs)]
    results = [f.result() for f in futures]
    for i, (r, resp) in enumerate(zip(reqs, results, strict=True)):
        assert resp.request_id == f"r{i}" and len(scores_of(resp)) == r[0].shape[0]
        np.testing.assert_allclose(scores_of(resp), client.predict(*r), atol=1e-6)
    batches = prom.value(gw.metrics_port, "gateway_batch_requests_count") - before_batches
    assert batches < 48 + 48  # the 48 concurrent ones ran in fewer than 48 batches


def _bad(client, req, code: grpc.StatusCode, match: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        client.predict_request(req)
    assert e.value.code() == code, e.value.details()
    assert match in e.value.details(), e.value.details()


def test_bad_input_gets_a_precise_status_and_the_server_keeps_serving(gateway):
    gw, client = gateway
    dense, lengths, values = batch(4)
    ok = client.predict(dense, lengths, values)
    inv = grpc.StatusCode.INVALID_ARGUMENT
    _bad(client, build_request(dense, lengths, values, features=[*FEATURES[:4], "nope"]), inv,
         "features: unknown feature 'nope'")
    _bad(client, build_request(dense, lengths[:16], values[: int(lengths[:16].sum())], features=FEATURES[:4]), inv,
         "features: missing feature 'hour'")
    _bad(client, build_request(dense[:, :3], lengths, values), inv, "dense: width 3, model dlrm v1 takes 4")
    _bad(client, build_request(dense, lengths, values[:-1]), inv, "lengths: add up to 40 but values holds 39")
    _bad(client, build_request(dense, lengths[:-1], values), inv, "lengths: 19 entries")
    wrap = lengths.astype(np.int64)
    wrap[:4] += 1 << 62  # four huge bags: the int64 sum wraps to the right total
    _bad(client, build_request(dense, wrap, values), inv, "lengths: an entry exceeds the 40 ids in values")
    big = values.copy()
    big[0] = 200  # users has 200 rows
    _bad(client, build_request(dense, lengths, big), inv, "values: id 200 of feature 'user' is out of range [0, 200)")
    neg = values.copy()
    neg[-1] = -1
    _bad(client, build_request(dense, lengths, neg), inv, "feature 'hour' is out of range [0, 24)")
    for v in (np.nan, np.inf):
        d = dense.copy()
        d[2, 1] = v
        _bad(client, build_request(d, lengths, values), inv, "dense: NaN or Inf at sample 2, column 1")
    wrong = build_request(dense, lengths, values)
    wrong.dense.dtype = common_pb2.FLOAT16
    _bad(client, wrong, inv, "dense: dtype FLOAT16 is not one of ['FLOAT32']")
    short = build_request(dense, lengths, values)
    short.values.data = short.values.data[:-3]
    _bad(client, short, inv, "values: 317 bytes do not match shape [40]")
    _bad(client, build_request(*batch(513)), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "dense: 513 samples exceed max_request_samples 512")
    _bad(client, build_request(dense, lengths, values, model="other"), grpc.StatusCode.NOT_FOUND,
         "model: 'other' is not loaded")
    _bad(client, build_request(dense, lengths, values, version=9), grpc.StatusCode.NOT_FOUND,
         "version: model 'dlrm' has no version 9")
    np.testing.assert_array_equal(client.predict(dense, lengths, values), ok)  # nothing changed
    assert prom.value(gw.metrics_port, "gateway_requests_total", code="INVALID_ARGUMENT") >= 10


def test_out_of_range_ids_map_to_a_zero_row_when_the_package_says_so(gateway):
    _, client = gateway
    dense, lengths, values = batch(2)
    extra_lengths = lengths.copy()
    extra_lengths[0] += 1  # user bag of sample 0 gets one more id, out of range
    extra_values = np.concatenate([values[:1], [10_000], values[1:]])
    a = client.predict(dense, lengths, values, model="zeroed")
    b = client.predict(dense, extra_lengths, extra_values, model="zeroed")
    np.testing.assert_allclose(a, b, atol=1e-6)
    _bad(client, build_request(dense, extra_lengths, extra_values), grpc.StatusCode.INVALID_ARGUMENT,
         "id 10000 of feature 'user'")


def test_stream_answers_every_request_and_survives_a_bad_one(gateway):
    _, client = gateway
    reqs = [build_request(*batch(2, index=i), request_id=f"s{i}") for i in range(5)]
    reqs[2].dense.shape[:] = [2, 3]
    out = {r.request_id: r for r in client.stub.PredictStream(iter(reqs), timeout=30)}
    assert sorted(out) == [f"s{i}" for i in range(5)]
    assert out["s2"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "dense:" in out["s2"].error.message
    for i in (0, 1, 3, 4):
        assert out[f"s{i}"].error.code == 0
        np.testing.assert_allclose(scores_of(out[f"s{i}"]), client.predict(*batch(2, index=i)), atol=1e-6)


def test_health_reflection_metrics_and_access_log(gateway):
    gw, client = gateway
    channel = client.channel
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="recsys.v1.InferenceGateway"), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "recsys.v1.InferenceGateway" in {s.name for s in resp.list_services_response.service}
    client.predict(*batch(3), request_id="logged-1")
    for name in ("gateway_request_seconds_bucket", "gateway_batch_samples_bucket", "gateway_queue_samples",
                 "gateway_rejects_total"):
        prom.value(gw.metrics_port, name)  # fails on a name the gateway does not export
    assert prom.value(gw.metrics_port, "gateway_request_seconds_count", method="Predict") > 0
    time.sleep(0.2)
    lines = [json.loads(line.split("inference_gateway.access: ", 1)[1]) for line in gw.log_text().splitlines()
             if "inference_gateway.access: " in line]
    entry = next(e for e in lines if e["request_id"] == "logged-1")
    assert entry["code"] == "OK" and entry["samples"] == 3 and entry["model"] == "dlrm" and entry["ms"] > 0


def test_cli_predict_from_jsonl(gateway, tmp_path, capsys):
    gw, _ = gateway
    good = {"dense": [[0.1, 0.2, 0.3, 0.4]], "sparse": {"user": [[1, 2]], "item": [[3]], "last_item": [[4]],
                                                         "city": [[5]], "hour": [[6]]}, "request_id": "a"}
    bad = {**good, "sparse": {**good["sparse"], "hour": [[99]]}, "request_id": "b"}
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert gateway_main(["predict", "--address", gw.address, "--file", str(path), "--json"]) == 1
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out[0]["request_id"] == "a" and len(out[0]["scores"]) == 1 and 0 < out[0]["scores"][0] < 1
    assert out[1]["error"] == "INVALID_ARGUMENT" and "hour" in out[1]["message"]


def test_health_not_serving_until_loaded_then_sigterm_drains(pkgs, tmp_path, tmp_path_factory):
    # batches wait up to 2 s to fill 512 samples: the 20 requests below stay queued (in flight) until SIGTERM
    gw = launch(["--model-store", str(tmp_path_factory.getbasetemp()), "--max-wait-ms", "2000",
                 "--max-batch-size", "512"], workdir=tmp_path / "gw")
    try:
        with GatewayClient(gw.address) as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            _bad(client, build_request(*batch(1)), grpc.StatusCode.UNAVAILABLE, "no model is loaded")
            corrupt = shutil.copytree(pkgs["v1"], tmp_path / "corrupt")
            (corrupt / "dense.pt").write_bytes(b"x" + (corrupt / "dense.pt").read_bytes()[1:])
            with pytest.raises(grpc.RpcError) as e:
                client.load_model(str(corrupt))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "dense.pt: sha256 mismatch" in \
                e.value.details()
            info = client.load_model(str(pkgs["v1"]))
            assert info.is_default and info.version == 1
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            futures = [client.stub.Predict.future(build_request(*batch(8, index=i)), timeout=30) for i in range(20)]
            deadline = time.monotonic() + 30
            # every request reached the server and waits in its queue
            while (queued := prom.value(gw.metrics_port, "gateway_queue_samples")) < 20 * 8:
                assert time.monotonic() < deadline and not any(f.done() for f in futures), queued
                time.sleep(0.01)
            assert gw.terminate() == 0
            codes = [grpc.StatusCode.OK if f.exception() is None else f.code() for f in futures]
            assert codes == [grpc.StatusCode.OK] * 20, codes  # drained, not dropped
    finally:
        gw.kill()


def test_hot_swap_under_load_fails_no_request(pkgs, tmp_path, tmp_path_factory):
    gw = launch(["--model", str(pkgs["v1"]), "--model-store", str(tmp_path_factory.getbasetemp())],
                workdir=tmp_path / "gw")
    stop = threading.Event()
    versions: list[int] = []
    failures: list[str] = []

    def drive(k: int) -> None:
        with GatewayClient(gw.address) as c:
            i = 0
            while not stop.is_set():
                try:
                    versions.append(c.predict_request(build_request(*batch(2, index=k * 1000 + i))).version)
                except grpc.RpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")
                i += 1

    threads = [threading.Thread(target=drive, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        with GatewayClient(gw.address) as admin:
            time.sleep(0.3)
            admin.load_model(str(pkgs["v2"]))
            with pytest.raises(grpc.RpcError) as e:
                admin.unload_model("dlrm", 1)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # v1 is the default
            time.sleep(0.3)
            admin.set_default_version("dlrm", 2)
            time.sleep(0.3)
            admin.unload_model("dlrm", 1)
            time.sleep(0.3)
            listed = [(m.name, m.version, m.is_default) for m in admin.list_models()]
    finally:
        stop.set()
        for t in threads:
            t.join()
        gw.kill()
    assert not failures, failures[:3]
    assert listed == [("dlrm", 2, True)]
    assert versions[0] == 1 and versions[-1] == 2 and set(versions) == {1, 2}
    assert versions.index(2) > 10  # load really ran across the swap


def test_overload_is_refused_fast_and_expired_requests_are_dropped(pkgs, tmp_path):
    gw = launch(["--model", str(pkgs["v1"]), "--max-wait-ms", "1000", "--max-batch-size", "100000", "--max-queue",
                 "16", "--workers", "1"], workdir=tmp_path / "gw")
    try:
        with GatewayClient(gw.address) as client:
            with pytest.raises(grpc.RpcError) as e:
                client.predict(*batch(1), timeout=0.3)  # queued, waits 1 s for its batch to fill
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(1.0)
            # dropped before compute
            assert prom.value(gw.metrics_port, "gateway_rejects_total", reason="deadline") == 1
            assert prom.value(gw.metrics_port, "gateway_batch_samples_count") == 0
            start = time.perf_counter()
            finished: dict[int, float] = {}
            futures = [client.stub.Predict.future(build_request(*batch(1, index=i)), timeout=30) for i in range(40)]
            for i, f in enumerate(futures):
                f.add_done_callback(lambda _f, i=i: finished.__setitem__(i, time.perf_counter() - start))
            ok = [i for i, f in enumerate(futures) if f.exception() is None]
            rejected = [i for i, f in enumerate(futures) if f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert len(ok) == 16 and len(rejected) == 24
            # the rejected are answered at once; the accepted wait for their batch (max wait 1 s)
            assert max(finished[i] for i in rejected) < min(finished[i] for i in ok)
            assert max(finished[i] for i in rejected) < 0.8
            assert "queue full" in next(f for f in futures if f.exception() is not None).details()
            assert prom.value(gw.metrics_port, "gateway_rejects_total", reason="queue_full") == 24
    finally:
        gw.kill()


def test_gateway_serves_tls_only(pkgs, tmp_path, certs):
    gw = launch(["--model", str(pkgs["v1"]), "--tls-cert", certs["cert"], "--tls-key", certs["key"]],
                workdir=tmp_path / "gw")
    try:
        assert gw.announced["tls"] is True
        with GatewayClient(gw.address, tls_ca=certs["ca"]) as client:
            assert len(client.predict(*batch(3))) == 3
        with GatewayClient(gw.address) as plain, pytest.raises(grpc.RpcError) as e:
            plain.predict(*batch(1), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gw.kill()
