"""`inference-gateway serve-native --engine h2` where it differs from the grpc engine (tests/test_native_gateway.py
runs every other check on both): the predict token over h2c (the grpc engine's token test runs under mutual
TLS, which only grpc++ serves), and the CLI's refusal of --engine h2 with TLS."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2

from inference_gateway.client import build_request, scores_of
from inference_gateway.process import launch_native
from protos import inference_pb2_grpc
from tests.test_native_gateway import PREDICT, health
from tests.test_oip import ragged

TOKEN = "h2-predict-token"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from tests.test_inference_package import TINY, tiny_model
    from trainer.export import export_package, table_dtypes

    root = tmp_path_factory.mktemp("store")
    export_package(tiny_model(0), root / "v1", dtypes=table_dtypes(TINY, "int8", []), version=1)
    return root / "v1"


def test_h2_predict_token(package, tmp_path):
    """--predict-token-file on the h2 engine: Predict, PredictStream and ModelInfer need the bearer token,
    health and metadata do not; refusals never echo the token."""
    (tmp_path / "predict.token").write_text(TOKEN + "\n")
    g = launch_native(["--model", str(package), "--workers", "1", "--predict-token-file",
                       str(tmp_path / "predict.token")], workdir=tmp_path / "gw")
    try:
        assert g.announced["engine"] == "h2"  # auto: h2 without TLS
        req = build_request(*ragged(2, 4))
        with grpc.insecure_channel(g.address) as ch:
            s = inference_pb2_grpc.InferenceGatewayStub(ch)
            good = [("authorization", f"Bearer {TOKEN}")]
            assert scores_of(s.Predict(req, timeout=30, metadata=good)).shape == (2,)
            [streamed] = s.PredictStream(iter([req]), timeout=30, metadata=good)
            assert scores_of(streamed).shape == (2,)
            for md, code in (([], grpc.StatusCode.UNAUTHENTICATED),
                             ([("authorization", "Bearer nope")], grpc.StatusCode.PERMISSION_DENIED)):
                for method in (PREDICT, "/recsys.v1.InferenceGateway/PredictStream",
                               "/inference.GRPCInferenceService/ModelInfer"):
                    with pytest.raises(grpc.RpcError) as e:
                        ch.unary_unary(method)(b"", timeout=30, metadata=md)
                    assert e.value.code() == code and method in e.value.details(), e.value
                    assert TOKEN not in e.value.details()
            meta = ch.unary_unary("/inference.GRPCInferenceService/ServerMetadata")(b"", timeout=30)
            assert b"recsys-inference-gateway" in meta
        assert health(g) == health_pb2.HealthCheckResponse.SERVING
    finally:
        g.kill()


def test_h2_refuses_tls(package, tmp_path):
    r = subprocess.run([sys.executable, "-m", "inference_gateway.cli", "serve-native", "--model", str(package),
                        "--engine", "h2", "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--engine h2" in r.stderr, r.stderr
