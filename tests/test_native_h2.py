"""`inference-gateway serve-native --engine h2`: the frontend's unary calls served on nghttp2 instead of
grpc++ (a tenth of the CPU a call: benchmarks/h2_floor.py), as real processes. The same answers as the grpc
engine (tests/test_native_gateway.py's checks, run here again): the package's scores in merged batches,
serve's errors, the Open Inference Protocol with Triton's own client, refusal at arrival, the predict token,
health, SETTINGS, and SIGTERM's drain; what it does not serve yet (PredictStream, reflection, TLS) is
refused with a message that says so. One gateway serves the module; the last test stops it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from inference_gateway.client import build_request, scores_of
from inference_gateway.process import launch_native
from protos import inference_pb2_grpc
from tests import prom
from tests.test_native_gateway import (
    PREDICT,
    access_lines,
    answers_match_the_package,
    health,
    http2_settings,
    oip_answers_as_serve,
    refused_at_arrival,
    sigterm_answers_what_was_received,
    stub,
)
from tests.test_oip import ragged

TOKEN = "h2-predict-token"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from tests.test_inference_package import TINY, tiny_model
    from trainer.export import export_package, table_dtypes

    root = tmp_path_factory.mktemp("store")
    export_package(tiny_model(0), root / "v1", dtypes=table_dtypes(TINY, "int8", []), version=1)
    return root / "v1"


@pytest.fixture(scope="module")
def gw(package, tmp_path_factory):
    g = launch_native(["--model", str(package), "--workers", "2", "--max-wait-ms", "2", "--grace-s", "20",
                       "--access-log", "--engine", "h2"], workdir=tmp_path_factory.mktemp("native-h2"))
    yield g
    g.kill()


def test_h2_answers_what_the_package_computes_as_the_grpc_engine_does(gw, package):
    assert "frontend" in Path(f"/proc/{gw.announced['frontend_pid']}/comm").read_text()
    cmdline = Path(f"/proc/{gw.announced['frontend_pid']}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"--engine") + 1] == b"h2"
    answers_match_the_package(gw, package)


def test_h2_serves_the_open_inference_protocol_to_tritons_client(gw, package):
    oip_answers_as_serve(gw, package)


def test_h2_health_settings_and_what_it_does_not_serve(gw):
    """Health/Check as grpc++'s health service answers it (NOT_FOUND for another service), SETTINGS with the
    stream bound, an access-log line per call, and UNIMPLEMENTED, naming the engine, for PredictStream and
    reflection (the grpc engine serves them)."""
    assert health(gw) == health(gw, "recsys.v1.InferenceGateway") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health(gw, "other.Service")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "other.Service" in e.value.details()
    assert http2_settings(gw.address).get(3) == 256
    s = stub(gw)
    with pytest.raises(grpc.RpcError) as e:
        list(s.PredictStream(iter([build_request(*ragged(1, 3))]), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "h2 engine" in e.value.details(), e.value
    with grpc.insecure_channel(gw.address) as ch:
        reflect = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as e:
            list(reflect(iter([b"\x3a\x00"]), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        ready = ch.unary_unary("/inference.GRPCInferenceService/ServerReady")(b"", timeout=10)
        assert ready == b"\x08\x01"
        with pytest.raises(grpc.RpcError) as e:  # a compressed message: refused, named
            ch.unary_unary(PREDICT)(build_request(*ragged(1, 3)).SerializeToString(), timeout=10,
                                    compression=grpc.Compression.Gzip)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "compressed" in e.value.details()
    s.Predict(build_request(*ragged(2, 5), request_id="h2-log"), timeout=10)
    line = access_lines(gw, {"h2-log"})["h2-log"]
    assert (line["method"], line["code"], line["samples"], line["model"]) == ("Predict", "OK", 2, "dlrm")


def test_h2_refusal_at_arrival_and_cancelled_calls(gw):
    """A backlog of heavy requests: 20 ms probes are refused RESOURCE_EXHAUSTED at arrival; calls the client
    cancels while they are queued (RST_STREAM) are dropped before compute, and the gateway goes on serving."""
    refused_at_arrival(gw)
    time.sleep(1.2)
    expired = prom.value(gw.metrics_port, "gateway_expired_total")
    heavy = build_request(*ragged(4096, 13)).SerializeToString()
    light = build_request(*ragged(1, 3)).SerializeToString()
    own = [("grpc.use_local_subchannel_pool", 1)]  # its own connection: not queued behind the backlog's bytes
    with grpc.insecure_channel(gw.address) as ch, grpc.insecure_channel(gw.address, options=own) as other:
        backlog = [ch.unary_unary(PREDICT).future(heavy, timeout=120) for _ in range(200)]  # ~1 s for 2 workers
        backlog[0].result()
        gone = [other.unary_unary(PREDICT).future(light, timeout=120) for _ in range(20)]
        time.sleep(0.05)  # arrived, queued behind the backlog
        cancelled = [f for f in gone if f.cancel()]
        assert len(cancelled) >= 10, [f.code() for f in gone if not f.cancelled()]
        assert all(len(f.result()) > 4096 * 4 for f in backlog)
        assert scores_of(inference_pb2_grpc.InferenceGatewayStub(other).Predict(
            build_request(*ragged(3, 4)), timeout=30)).shape == (3,)
    time.sleep(1.2)
    assert prom.value(gw.metrics_port, "gateway_expired_total") - expired >= len(cancelled) // 2


def test_h2_predict_token(package, tmp_path):
    """--predict-token-file on the h2 engine: Predict and ModelInfer need the bearer token, health and
    metadata do not; the CLI refuses --engine h2 with TLS (h2c only)."""
    (tmp_path / "predict.token").write_text(TOKEN + "\n")
    g = launch_native(["--model", str(package), "--workers", "1", "--predict-token-file",
                       str(tmp_path / "predict.token"), "--engine", "h2"], workdir=tmp_path / "gw")
    try:
        req = build_request(*ragged(2, 4))
        with grpc.insecure_channel(g.address) as ch:
            s = inference_pb2_grpc.InferenceGatewayStub(ch)
            assert scores_of(s.Predict(req, timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")])).shape == (2,)
            for md, code in (([], grpc.StatusCode.UNAUTHENTICATED),
                             ([("authorization", "Bearer nope")], grpc.StatusCode.PERMISSION_DENIED)):
                for method in (PREDICT, "/inference.GRPCInferenceService/ModelInfer"):
                    with pytest.raises(grpc.RpcError) as e:
                        ch.unary_unary(method)(b"", timeout=30, metadata=md)
                    assert e.value.code() == code and method in e.value.details(), e.value
                    assert TOKEN not in e.value.details()
            meta = ch.unary_unary("/inference.GRPCInferenceService/ServerMetadata")(b"", timeout=30)
            assert b"recsys-inference-gateway" in meta
        assert health(g) == health_pb2.HealthCheckResponse.SERVING
    finally:
        g.kill()
    r = subprocess.run([sys.executable, "-m", "inference_gateway.cli", "serve-native", "--model", str(package),
                        "--engine", "h2", "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--engine h2" in r.stderr, r.stderr


def test_h2_sigterm_answers_everything_received(gw):
    """SIGTERM with a backlog queued: every request received is answered (OK, or UNAVAILABLE as draining),
    exit 0 well inside the grace."""
    s = stub(gw)
    time.sleep(1.2)
    prom_ok = prom.value(gw.metrics_port, "gateway_requests_total", method="Predict", code="OK")
    req = build_request(*ragged(256, 12))
    futures = [s.Predict.future(req, timeout=60) for _ in range(600)]
    futures[0].result()
    gw.proc.send_signal(signal.SIGTERM)
    sigterm_answers_what_was_received(gw, prom_ok, futures, time.monotonic())
