"""The Predict proxy (inference_gateway/predict_proxy.py, serve-triton's --predict-port) in front of a
real `inference-gateway serve` as its OIP target: the same scores as serve's own Predict for multi-hot
requests in any feature order, serve's exact errors for bad input without forwarding anything,
PredictStream answering each message, the target's failures mapped, and the predict token."""

from __future__ import annotations

import socket
import time

import grpc
import numpy as np
import pytest

from inference_gateway.client import GatewayClient, build_request, scores_of
from inference_gateway.process import launch
from protos import inference_pb2, inference_pb2_grpc
from protos.process import ServerProcess, start_announced
from protos.security import bearer_metadata
from tests import prom
from tests.test_inference_package import TINY, two_versions
from trainer.data import SyntheticData

FEATURES = [f.name for f in TINY.features]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return two_versions(tmp_path_factory.mktemp("proxy-pkgs"), "int8", "fp32")


def start_proxy(target: str, models: list, workdir, *extra: str) -> ServerProcess:
    args = ["inference_gateway.predict_proxy", "--target", target, *extra]
    for m in models:
        args += ["--model", str(m)]
    proc, msg = start_announced(args, workdir, what="predict proxy", timeout=120)
    return ServerProcess(proc, msg, workdir)


@pytest.fixture(scope="module")
def pair(store, tmp_path_factory):
    """serve with v1 and v2 (default v2, the highest: the rule the proxy applies), and the proxy in front."""
    serve = launch(["--model", str(store / "v1"), "--model", str(store / "v2"), "--max-wait-ms", "1"],
                   workdir=tmp_path_factory.mktemp("serve"))
    with GatewayClient(serve.address) as c:
        c.set_default_version("dlrm", 2)
    proxy = start_proxy(serve.address, [store / "v1", store / "v2"], tmp_path_factory.mktemp("proxy"))
    yield serve, proxy
    proxy.kill()
    serve.kill()


def batch(n: int, index: int = 0):
    b = SyntheticData(TINY, seed=7, pooling_factor=3).batch(index, n)
    return b.dense.numpy(), b.sparse.lengths.numpy(), b.sparse.values.numpy()


def model_infers(serve, code: str = "") -> float:
    """serve's count of ModelInfer requests (every forwarded Predict is one), of one status or any."""
    labels = {"method": "ModelInfer", **({"code": code} if code else {})}
    return prom.value(serve.metrics_port, "gateway_requests_total", **labels)


def test_predict_through_the_proxy_scores_as_serve(pair):
    serve, proxy = pair
    dense, lengths, values = batch(9)
    with GatewayClient(serve.address) as direct, GatewayClient(proxy.address) as via:
        for version in (0, 1, 2):
            req = build_request(dense, lengths, values, version=version, request_id=f"r{version}")
            want, got = direct.predict_request(req), via.predict_request(req)
            np.testing.assert_array_equal(scores_of(got), scores_of(want))
            assert (got.model, got.version, got.request_id) == ("dlrm", version or 2, f"r{version}")
        # the features in another order than the package's: reordered as serve does
        order = list(reversed(range(len(FEATURES))))
        lens = lengths.reshape(len(FEATURES), -1)
        segs = np.split(values, np.cumsum(lens.sum(1))[:-1])
        req = build_request(dense, lens[order].ravel(), np.concatenate([segs[i] for i in order]),
                            features=[FEATURES[i] for i in order])
        np.testing.assert_array_equal(scores_of(via.predict_request(req)), scores_of(direct.predict_request(req)))
        assert [(m.name, m.version, m.is_default) for m in via.list_models()] == [("dlrm", 1, False), ("dlrm", 2, True)]
        assert via.list_models()[0].table_bytes == direct.list_models()[0].table_bytes


BAD = {
    "dense width": lambda d, ln, v: build_request(d[:, :2], ln, v),
    "NaN": lambda d, ln, v: build_request(np.where(np.arange(d.size).reshape(d.shape) == 5, np.nan, d), ln, v),
    "unknown feature": lambda d, ln, v: build_request(d, ln, v, features=["nope", *FEATURES[1:]]),
    "lengths sum": lambda d, ln, v: build_request(d, ln, v[:-1]),
    "id out of range": lambda d, ln, v: build_request(d, ln, np.where(np.arange(v.size) == 3, 10**9, v)),
    "unknown model": lambda d, ln, v: build_request(d, ln, v, model="other"),
    "unknown version": lambda d, ln, v: build_request(d, ln, v, version=9),
}


def test_bad_input_gets_serves_errors_and_is_never_forwarded(pair):
    serve, proxy = pair
    dense, lengths, values = batch(4)
    before = model_infers(serve)
    with GatewayClient(serve.address) as direct, GatewayClient(proxy.address) as via:
        for what, make in BAD.items():
            req = make(dense, lengths, values)
            errors = []
            for client in (direct, via):
                with pytest.raises(grpc.RpcError) as e:
                    client.predict_request(req)
                errors.append((e.value.code(), e.value.details()))
            assert errors[0] == errors[1], what
            assert errors[0][0] in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (what, errors)
        assert model_infers(serve) == before  # refused by the proxy: nothing reached the target
        ok = via.predict_request(build_request(dense, lengths, values))  # and it still serves
        assert scores_of(ok).shape == (4,)
    assert model_infers(serve) == before + 1


def test_predict_stream_answers_each_message_and_goes_on(pair):
    serve, proxy = pair
    dense, lengths, values = batch(3)
    reqs = [build_request(dense, lengths, values, request_id="a"),
            build_request(dense[:, :2], lengths, values, request_id="bad"),
            build_request(dense, lengths, values, version=1, request_id="b")]
    with grpc.insecure_channel(proxy.address) as ch, GatewayClient(serve.address) as direct:
        answers = {r.request_id: r for r in inference_pb2_grpc.InferenceGatewayStub(ch).PredictStream(
            iter(reqs), timeout=60)}
        assert set(answers) == {"a", "bad", "b"}
        assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert answers["bad"].error.message.startswith("dense: width 2")
        for rid, req in (("a", reqs[0]), ("b", reqs[2])):
            assert not answers[rid].error.code
            np.testing.assert_array_equal(scores_of(answers[rid]), scores_of(direct.predict_request(req)))


def test_a_target_that_is_down_or_silent_is_answered_with_its_code(store, tmp_path):
    """Nothing listens: UNAVAILABLE naming the target. A target that accepts and never answers: the caller's
    deadline is the forwarded call's, so the caller gets DEADLINE_EXCEEDED from the proxy in time."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts TCP, never speaks HTTP/2
    mute = f"127.0.0.1:{silent.getsockname()[1]}"
    for d in ("dead", "mute"):
        (tmp_path / d).mkdir()
    proxies = [start_proxy(t, [store / "v1"], tmp_path / n) for t, n in ((dead, "dead"), (mute, "mute"))]
    try:
        dense, lengths, values = batch(2)
        with GatewayClient(proxies[0].address) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.predict_request(build_request(dense, lengths, values), timeout=60)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and dead in e.value.details(), e.value.details()
        with GatewayClient(proxies[1].address) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.predict_request(build_request(dense, lengths, values), timeout=3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # the proxy is not stuck on the forwarded call: it answers the next one at once
            with pytest.raises(grpc.RpcError) as e:
                c.predict_request(build_request(dense[:, :1], lengths, values), timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for p in proxies:
            p.kill()
        silent.close()


def test_predict_token_guards_predict_not_list_models(pair, store, tmp_path):
    serve, _ = pair
    token = tmp_path / "predict.token"
    token.write_text("s3cret\n")
    (tmp_path / "p").mkdir()
    proxy = start_proxy(serve.address, [store / "v1", store / "v2"], tmp_path / "p", "--predict-token-file",
                        str(token))
    try:
        req = build_request(*batch(2))
        with grpc.insecure_channel(proxy.address) as ch:
            stub = inference_pb2_grpc.InferenceGatewayStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.Predict(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                stub.Predict(req, timeout=30, metadata=bearer_metadata("wrong"))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert scores_of(stub.Predict(req, timeout=30, metadata=bearer_metadata("s3cret"))).shape == (2,)
            assert len(stub.ListModels(inference_pb2.ListModelsRequest(), timeout=30).models) == 2
            with pytest.raises(grpc.RpcError) as e:  # management is not on the inference side
                stub.LoadModel(inference_pb2.LoadModelRequest(path="v1"), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        proxy.kill()


def test_a_caller_whose_deadline_passes_leaves_nothing_running_at_the_target(store, tmp_path):
    """A target that holds a lone request 4 s for its batch to fill: once the caller's 1 s deadline passes,
    the target drops the request instead of scoring it for nobody (the forwarded call carries the remaining
    deadline and is cancelled with the caller's; this test cannot tell which of the two did it)."""
    (tmp_path / "p").mkdir()
    slow = launch(["--model", str(store / "v1"), "--max-wait-ms", "4000"], workdir=tmp_path / "slow")
    proxy = start_proxy(slow.address, [store / "v1"], tmp_path / "p")
    try:
        req = build_request(*batch(1))
        with GatewayClient(proxy.address) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.predict_request(req, timeout=1)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(6)  # past the batch wait: a request still held would be scored by now
            assert model_infers(slow, "OK") == 0
            assert scores_of(c.predict_request(req, timeout=30)).shape == (1,)  # a patient caller is served
        assert model_infers(slow, "OK") == 1
    finally:
        proxy.kill()
        slow.kill()
