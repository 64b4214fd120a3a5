"""The Open Inference Protocol on the gateway's port, called with the real Triton client
(tritonclient.grpc, unchanged): readiness, metadata, scores equal to Predict's, precise errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inference_gateway.client import GatewayClient
from inference_gateway.process import launch
from tests import prom
from tests.test_inference_package import TINY, tiny_model
from trainer.data import SyntheticData
from trainer.export import export_package, table_dtypes

FEATURES = [f.name for f in TINY.features]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("oip-pkgs")
    v1 = export_package(tiny_model(0), root / "v1", dtypes=table_dtypes(TINY, "int8", []), version=1)
    v2 = export_package(tiny_model(1), root / "v2", dtypes=table_dtypes(TINY, "fp32", []), version=2)
    gw = launch(["--model", str(v1), "--model", str(v2), "--max-request-samples", "512"],
                workdir=tmp_path_factory.mktemp("oip-gw"))
    ours = GatewayClient(gw.address)
    client = triton.InferenceServerClient(url=gw.address)
    yield gw, client, ours
    client.close()
    ours.close()
    gw.kill()


def batch(n: int, index: int = 0):
    b = SyntheticData(TINY, seed=5, pooling_factor=2).batch(index, n)
    return b.dense.numpy(), b.sparse.lengths.numpy(), b.sparse.values.numpy()


def inputs(dense, lengths, values, *, id_dtype=np.int64) -> list[triton.InferInput]:
    """Predict's feature-major (lengths, values) split into one lengths and one values input per feature."""
    n = dense.shape[0]
    lens = lengths.reshape(len(FEATURES), n)
    segments = np.split(values, np.cumsum(lens.sum(1))[:-1])
    datatype = "INT64" if id_dtype == np.int64 else "INT32"
    out = [triton.InferInput("dense", list(dense.shape), "FP32")]
    out[0].set_data_from_numpy(dense)
    for f, ln, seg in zip(FEATURES, lens, segments, strict=True):
        for name, a in ((f"{f}.lengths", ln), (f"{f}.values", seg)):
            t = triton.InferInput(name, [a.size], datatype)
            t.set_data_from_numpy(a.astype(id_dtype))
            out.append(t)
    return out


def ragged(n: int, seed: int):
    """n samples whose bags hold 0..4 ids (Predict's feature-major lengths and values)."""
    g = np.random.default_rng(seed)
    rows = [next(t.num_rows for t in TINY.tables if t.name == f.table) for f in TINY.features]
    lengths = g.integers(0, 5, (len(rows), n))
    values = np.concatenate([g.integers(0, r, int(ln.sum())) for r, ln in zip(rows, lengths, strict=True)])
    return g.standard_normal((n, TINY.dense_features), dtype=np.float32), lengths.ravel(), values.astype(np.int64)


def batched_inputs(dense, lengths, values) -> list[triton.InferInput]:
    """The same samples in the batched form serve-triton requires: lengths [B, 1], values [B, K] with bag b
    in row b (padded with -1 to the longest bag of that feature)."""
    n = dense.shape[0]
    lens = lengths.reshape(len(FEATURES), n)
    segments = np.split(values, np.cumsum(lens.sum(1))[:-1])
    out = [triton.InferInput("dense", list(dense.shape), "FP32")]
    out[0].set_data_from_numpy(dense)
    for f, ln, seg in zip(FEATURES, lens, segments, strict=True):
        rows = np.full((n, max(int(ln.max()), 1)), -1, dtype=np.int64)
        rows[np.arange(rows.shape[1]) < ln[:, None]] = seg
        for name, a in ((f"{f}.lengths", ln.reshape(n, 1).astype(np.int64)), (f"{f}.values", rows)):
            t = triton.InferInput(name, list(a.shape), "INT64")
            t.set_data_from_numpy(a)
            out.append(t)
    return out


def bags_inputs(dense, lengths, values, pad: int = 0) -> list[triton.InferInput]:
    """The compact multi-hot form: dense, lengths [B, features] and values [B, K] (row b: sample b's bags in
    package feature order, then `pad` extra columns of -1) from Predict's feature-major arrays."""
    n = dense.shape[0]
    lens = lengths.reshape(len(FEATURES), n)
    segments = np.split(values, np.cumsum(lens.sum(1))[:-1])
    starts = [np.concatenate([[0], np.cumsum(ln)[:-1]]) for ln in lens]
    rows = [np.concatenate([seg[st[b]:st[b] + ln[b]] for seg, st, ln in zip(segments, starts, lens, strict=True)])
            for b in range(n)]
    k = max(max(len(r) for r in rows), 1) + pad
    padded = np.full((n, k), -1, dtype=np.int64)
    for b, r in enumerate(rows):
        padded[b, :len(r)] = r
    out = []
    for name, a, dtype in (("dense", dense, "FP32"), ("lengths", np.ascontiguousarray(lens.T, dtype=np.int64), "INT64"),
                           ("values", padded, "INT64")):
        t = triton.InferInput(name, list(a.shape), dtype)
        t.set_data_from_numpy(a)
        out.append(t)
    return out


def ids_inputs(dense, ids) -> list[triton.InferInput]:
    """The compact single-hot form: dense and ids [B, features] (package order)."""
    out = [triton.InferInput("dense", list(dense.shape), "FP32"), triton.InferInput("ids", list(ids.shape), "INT64")]
    out[0].set_data_from_numpy(dense)
    out[1].set_data_from_numpy(ids.astype(np.int64))
    return out


def refused(call, code: str, text: str) -> None:
    with pytest.raises(InferenceServerException) as e:
        call()
    assert e.value.status() == f"StatusCode.{code}", (e.value.status(), e.value.message())
    assert text in e.value.message(), e.value.message()


def test_server_and_model_readiness_and_metadata(gateway):
    _, client, _ = gateway
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "recsys-inference-gateway"
    assert client.is_model_ready("dlrm") and client.is_model_ready("dlrm", "2")
    assert not client.is_model_ready("dlrm", "9") and not client.is_model_ready("nope")
    meta = client.get_model_metadata("dlrm")
    assert meta.name == "dlrm" and list(meta.versions) == ["1", "2"]
    got = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    assert got[0] == ("dense", "FP32", [-1, TINY.dense_features])
    assert got[1:] == [(f"{f}.{part}", "INT64", [-1]) for f in FEATURES for part in ("lengths", "values")]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("scores", "FP32", [-1])]
    refused(lambda: client.get_model_metadata("nope"), "NOT_FOUND", "model: 'nope' is not loaded")
    refused(lambda: client.get_model_metadata("dlrm", "x"), "INVALID_ARGUMENT", "version: 'x' is not a version number")


def test_infer_scores_equal_predict_for_the_same_samples(gateway):
    _, client, ours = gateway
    dense, lengths, values = batch(32)
    expected = ours.predict(dense, lengths, values)
    result = client.infer("dlrm", inputs(dense, lengths, values), request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("scores"), expected, atol=1e-6)
    response = result.get_response()
    assert response.id == "r-1" and response.model_version == "1"  # empty version: the default
    # INT32 ids, an explicit version, and a requested output
    expected_v2 = ours.predict(dense, lengths, values, version=2)
    assert not np.allclose(expected_v2, expected)
    v2 = client.infer("dlrm", inputs(dense, lengths, values, id_dtype=np.int32), model_version="2",
                      outputs=[triton.InferRequestedOutput("scores")])
    np.testing.assert_allclose(v2.as_numpy("scores"), expected_v2, atol=1e-6)


def test_typed_contents_give_the_same_scores_as_raw(gateway):
    gw, _, ours = gateway
    dense, lengths, values = batch(8, index=3)
    expected = ours.predict(dense, lengths, values)
    req = service_pb2.ModelInferRequest(model_name="dlrm")
    for t in inputs(dense, lengths, values):  # the client's own tensors, contents typed instead of raw
        tensor = t._get_tensor()
        data = np.frombuffer(t._get_content(), dtype=np.float32 if tensor.datatype == "FP32" else np.int64)
        field = "fp32_contents" if tensor.datatype == "FP32" else "int64_contents"
        getattr(tensor.contents, field).extend(data.tolist())
        req.inputs.append(tensor)
    with grpc.insecure_channel(gw.address) as channel:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30)
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("scores", "FP32", [8])]
    np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], dtype=np.float32), expected, atol=1e-6)


def test_bad_inputs_get_the_precise_errors_of_predict(gateway):
    gw, client, _ = gateway
    dense, lengths, values = batch(4)
    good = inputs(dense, lengths, values)
    ok = client.infer("dlrm", good).as_numpy("scores")
    inv = "INVALID_ARGUMENT"

    def infer(tensors, model="dlrm", **kw):
        return lambda: client.infer(model, tensors, **kw)

    refused(infer(good[:-1]), inv, "inputs: missing input 'hour.values'")
    extra = triton.InferInput("colour", [1], "INT64")
    extra.set_data_from_numpy(np.zeros(1, dtype=np.int64))
    refused(infer([*good, extra]), inv, "inputs: unknown input 'colour'")
    narrow = triton.InferInput("dense", [4, 3], "FP32")
    narrow.set_data_from_numpy(dense[:, :3].copy())
    refused(infer([narrow, *good[1:]]), inv, "dense: width 3, model dlrm v1 takes 4")
    fp64 = triton.InferInput("dense", [4, 4], "FP64")
    fp64.set_data_from_numpy(dense.astype(np.float64))
    refused(infer([fp64, *good[1:]]), inv, "dense: datatype FP64 is not one of ['FP32']")
    short = triton.InferInput("dense", [4, 4], "FP32")
    short.set_data_from_numpy(dense)
    short.set_shape([4, 5])  # 64 bytes sent, 80 declared
    refused(infer([short, *good[1:]]), inv, "dense: 64 bytes do not match shape [4, 5] of FP32 (80 expected)")
    nan = dense.copy()
    nan[2, 1] = np.nan
    refused(infer(inputs(nan, lengths, values)), inv, "dense: NaN or Inf at sample 2, column 1")
    three = triton.InferInput("user.lengths", [3], "INT64")
    three.set_data_from_numpy(np.ones(3, dtype=np.int64))
    refused(infer([good[0], three, *good[2:]]), inv, "user.lengths: shape [3], expected [4]")
    fewer = triton.InferInput("user.values", [1], "INT64")
    fewer.set_data_from_numpy(np.zeros(1, dtype=np.int64))
    refused(infer([*good[:2], fewer, *good[3:]]), inv, "user.lengths: add up to 8 but user.values holds 1 ids")
    big = values.copy()
    big[0] = 200  # users has 200 rows
    refused(infer(inputs(dense, lengths, big)), inv, "values: id 200 of feature 'user' is out of range [0, 200)")
    refused(infer(good, outputs=[triton.InferRequestedOutput("logits")]), inv, "outputs: unknown output 'logits'")
    refused(infer(good, model="other"), "NOT_FOUND", "model: 'other' is not loaded")
    refused(infer(good, model_version="9"), "NOT_FOUND", "version: model 'dlrm' has no version 9")
    refused(infer(good, model_version="v1"), inv, "model_version: 'v1' is not a version number")
    refused(infer(inputs(*batch(513))), "RESOURCE_EXHAUSTED", "dense: 513 samples exceed max_request_samples 512")
    np.testing.assert_array_equal(client.infer("dlrm", good).as_numpy("scores"), ok)  # nothing changed
    assert prom.value(gw.metrics_port, "gateway_requests_total", code="INVALID_ARGUMENT", method="ModelInfer") == 11
    assert prom.value(gw.metrics_port, "gateway_requests_total", code="OK", method="ModelInfer") >= 2


def test_the_batched_form_of_serve_triton_gives_the_same_scores(gateway):
    _, client, ours = gateway
    dense, lengths, values = ragged(16, seed=7)  # multi-hot: bags of 0..4 ids
    expected = ours.predict(dense, lengths, values)
    got = client.infer("dlrm", batched_inputs(dense, lengths, values))
    assert got.as_numpy("scores").shape == (16, 1)  # answered as serve-triton answers it
    np.testing.assert_allclose(got.as_numpy("scores").ravel(), expected, atol=1e-6)
    tensors = batched_inputs(dense, lengths, values)
    wide = triton.InferInput("user.lengths", [16, 1], "INT64")
    wide.set_data_from_numpy(np.full((16, 1), 99, dtype=np.int64))
    tensors[1] = wide
    k = tensors[2].shape()[1]
    refused(lambda: client.infer("dlrm", tensors), "INVALID_ARGUMENT",
            f"user.lengths: entry 99 at sample 0 exceeds the {k} columns of user.values")
    tensors = batched_inputs(dense, lengths, values)
    flat = triton.InferInput("user.values", [k * 16], "INT64")
    flat.set_data_from_numpy(np.zeros(k * 16, dtype=np.int64))
    tensors[2] = flat
    refused(lambda: client.infer("dlrm", tensors), "INVALID_ARGUMENT",
            f"user.values: shape [{k * 16}], expected [16, -1] (a row of ids per sample, as user.lengths is [16, 1])")
    # single-hot: `ids` [B, features] alone stands for every lengths and values
    one = SyntheticData(TINY, seed=5).batch(2, 8)
    dense, lengths, values = one.dense.numpy(), one.sparse.lengths.numpy(), one.sparse.values.numpy()
    ids = values.reshape(len(FEATURES), 8).T.copy()
    got = client.infer("dlrm", ids_inputs(dense, ids)).as_numpy("scores")
    assert got.shape == (8, 1)
    np.testing.assert_allclose(got.ravel(), ours.predict(dense, lengths, values), atol=1e-6)
    refused(lambda: client.infer("dlrm", ids_inputs(dense, ids[:, :2].copy())), "INVALID_ARGUMENT",
            f"ids: shape [8, 2], expected [8, {len(FEATURES)}] (one id per feature per sample")
    refused(lambda: client.infer("dlrm", [*ids_inputs(dense, ids), *inputs(dense, lengths, values)[1:3]]),
            "INVALID_ARGUMENT", "inputs: 'user.lengths' and 'ids' (single-hot ids [B, features] replace")


def test_the_compact_multi_hot_form_gives_the_same_scores_and_errors(gateway):
    """dense + lengths [B, features] + values [B, K]: three inputs for any bags (what serve-triton's
    Predict proxy forwards), the same scores as the per-feature form, precise errors."""
    _, client, ours = gateway
    dense, lengths, values = ragged(16, seed=9)
    expected = ours.predict(dense, lengths, values)
    for pad in (0, 3):  # rows padded past the longest sample are ignored
        got = client.infer("dlrm", bags_inputs(dense, lengths, values, pad)).as_numpy("scores")
        assert got.shape == (16, 1)
        np.testing.assert_allclose(got.ravel(), expected, atol=1e-6)
    inv = "INVALID_ARGUMENT"
    good = bags_inputs(dense, lengths, values)
    k = good[2].shape()[1]
    wide = triton.InferInput("lengths", [16, len(FEATURES)], "INT64")
    wide.set_data_from_numpy(np.full((16, len(FEATURES)), k, dtype=np.int64))
    refused(lambda: client.infer("dlrm", [good[0], wide, good[2]]), inv,
            f"lengths: the bags of sample 0 hold {k * len(FEATURES)} ids, more than the {k} columns of values")
    huge = np.zeros((16, len(FEATURES)), dtype=np.int64)
    huge[:, 0] = 1
    huge[0, 1:5] += 1 << 62  # four huge bags: sample 0's int64 sum wraps to 1
    wrapped = triton.InferInput("lengths", [16, len(FEATURES)], "INT64")
    wrapped.set_data_from_numpy(huge)
    refused(lambda: client.infer("dlrm", [good[0], wrapped, good[2]]), inv,
            f"lengths: the bags of sample 0 hold {1 + 4 * (k + 1)} ids, more than the {k} columns of values")
    narrow = triton.InferInput("lengths", [16, 2], "INT64")
    narrow.set_data_from_numpy(np.ones((16, 2), dtype=np.int64))
    refused(lambda: client.infer("dlrm", [good[0], narrow, good[2]]), inv,
            f"lengths: shape [16, 2], expected [16, {len(FEATURES)}] (one bag length per feature per sample")
    refused(lambda: client.infer("dlrm", good[:2]), inv, "inputs: missing input 'values'")
    refused(lambda: client.infer("dlrm", [*good, *inputs(dense, lengths, values)[1:3]]), inv,
            "inputs: 'user.lengths' and 'lengths' / 'values' (the compact form")


def test_predict_token_guards_model_infer_but_not_readiness(tmp_path):
    pkg = export_package(tiny_model(0), tmp_path / "pkg", dtypes=table_dtypes(TINY, "int8", []))
    (tmp_path / "predict.token").write_text("s3cret-predict\n")
    gw = launch(["--model", str(pkg), "--predict-token-file", str(tmp_path / "predict.token")],
                workdir=tmp_path / "gw")
    client = triton.InferenceServerClient(url=gw.address)
    try:
        assert client.is_server_ready() and client.get_model_metadata("dlrm").name == "dlrm"
        tensors = inputs(*batch(2))
        refused(lambda: client.infer("dlrm", tensors), "UNAUTHENTICATED", "")
        refused(lambda: client.infer("dlrm", tensors, headers={"authorization": "Bearer nope"}),
                "PERMISSION_DENIED", "")
        scores = client.infer("dlrm", tensors, headers={"authorization": "Bearer s3cret-predict"}).as_numpy("scores")
        assert scores.shape == (2,)
    finally:
        client.close()
        gw.kill()
