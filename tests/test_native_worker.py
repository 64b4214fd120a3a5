"""serve-native's Predict fast path in-process (the worker's batching and wire are tested as processes in
test_native_gateway): a batch decoded at once (`decode_batch`, with its single-hot shortcut) scores exactly
as each request decoded alone does, and a batch it cannot take whole (requests not alike, or one whose ids
do not match its own bags) is refused whole, so the worker decodes each request alone and names the bad one.
The hand-written PredictResponse is byte-equal to protobuf's."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from inference_gateway.batching import merge
from inference_gateway.client import build_request
from inference_gateway.model import ServingModel
from inference_gateway.native.predict_batch import decode_batch, predict_response, predict_responses
from inference_gateway.requests import Limits, RequestError, decode
from protos import common_pb2, inference_pb2
from protos.package import load_package
from tests.test_inference_package import TINY, tiny_model
from tests.test_oip import ragged
from trainer.export import export_package, table_dtypes

NFEAT = len(TINY.features)
ROWS = [next(t.num_rows for t in TINY.tables if t.name == f.table) for f in TINY.features]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ServingModel:
    root = tmp_path_factory.mktemp("worker")
    export_package(tiny_model(3), root / "v1", dtypes=table_dtypes(TINY, "int8", []), version=1)
    return ServingModel(load_package(root / "v1"))


def single_hot(n: int, seed: int):
    """n samples with one id per bag (Criteo's shape, the single-hot shortcut)."""
    g = np.random.default_rng(seed)
    values = np.concatenate([g.integers(0, r, n) for r in ROWS])  # feature-major
    return g.standard_normal((n, TINY.dense_features), dtype=np.float32), np.ones(NFEAT * n, np.int64), values


def scored_alone(model: ServingModel, sample) -> np.ndarray:
    return model.scores(*(torch.from_numpy(a) for a in sample)).numpy()


@pytest.mark.parametrize("kind", ["one sample, single-hot", "one sample, multi-hot", "ragged", "int32 ids",
                                  "one and several samples", "features named in reverse"])
def test_a_batch_decoded_at_once_scores_as_each_request_alone(model, kind):
    samples = {"one sample, single-hot": [single_hot(1, k) for k in range(9)],
               "one sample, multi-hot": [ragged(1, 40 + k) for k in range(9)],
               "ragged": [ragged(1 + k % 4, 60 + k) for k in range(9)],
               "int32 ids": [single_hot(1, 80 + k) for k in range(9)],
               "one and several samples": [single_hot(1, k) if k % 2 else ragged(3, 90 + k) for k in range(9)],
               "features named in reverse": [single_hot(1, 100 + k) for k in range(9)]}[kind]
    dtype = np.int32 if kind == "int32 ids" else np.int64
    if kind == "features named in reverse":  # one id per bag: the request's bags in its own feature order
        names = [f.name for f in reversed(TINY.features)]
        reqs = [build_request(d, ln, v[::-1], features=names) for d, ln, v in samples]
    else:
        reqs = [build_request(d, ln.astype(dtype), v.astype(dtype)) for d, ln, v in samples]
    whole = decode_batch(reqs, model, Limits())
    assert whole is not None  # the fast path took the batch whole
    scores, start = model.scores(*merge([whole])).numpy(), 0
    for sample in samples:
        n = sample[0].shape[0]
        np.testing.assert_allclose(scores[start:start + n], scored_alone(model, sample), rtol=1e-5, atol=1e-6)
        start += n
    assert start == len(scores)


def test_a_request_whose_ids_miss_its_bags_is_not_taken_in_a_batch(model):
    """Every bag holds one id and the batch's ids add up, but one request has an id too many and the next
    one too few: the fast path must not pair ids across requests. It refuses the batch; decoded alone, each
    of the two gets its own error and the others score."""
    good = [single_hot(1, k) for k in range(3)]
    d, ln, v = single_hot(1, 10)
    d2, ln2, v2 = single_hot(1, 11)
    samples = [good[0], (d, ln, np.append(v, 0)), (d2, ln2, v2[:-1]), good[1], good[2]]
    reqs = [build_request(*s) for s in samples]
    assert decode_batch(reqs, model, Limits()) is None
    assert decode_batch([reqs[0], reqs[3], reqs[4]], model, Limits()) is not None
    for bad in reqs[1:3]:
        with pytest.raises(RequestError) as e:
            decode(bad, model, Limits())
        assert "lengths: add up to" in e.value.message


@pytest.mark.parametrize("samples", [1, 3, 256, 5000])
def test_the_written_response_is_byte_equal_to_protobufs(samples):
    scores = np.random.default_rng(samples).random(samples, dtype=np.float32)
    for rid in ("", "7", "é-ü" * 50):
        for name, version in (("dlrm", 1), ("", 0), ("m" * 300, 2**40)):
            want = inference_pb2.PredictResponse(
                scores=common_pb2.Tensor(dtype=common_pb2.FLOAT32, shape=[samples], data=scores.tobytes()),
                model=name, version=version, request_id=rid).SerializeToString()
            got = predict_response(inference_pb2.PredictRequest(request_id=rid),
                                    SimpleNamespace(name=name, version=version), scores)
            assert got == want, (samples, rid, name, version)


@pytest.mark.parametrize("sizes", [[1] * 33, [1, 3, 1, 2]])
def test_a_batchs_answers_are_each_requests_own(sizes):
    """predict_responses (one score conversion for a batch of one-sample requests) writes what
    predict_response writes for each request alone, with each request's own scores and request_id."""
    scores = np.random.default_rng(len(sizes)).random(sum(sizes), dtype=np.float32)
    reqs = [inference_pb2.PredictRequest(request_id="" if i % 3 == 0 else f"id-{i}", dense=common_pb2.Tensor(
        dtype=common_pb2.FLOAT32, shape=[b, 4], data=bytes(16 * b))) for i, b in enumerate(sizes)]
    m = SimpleNamespace(name="dlrm", version=7)
    starts = np.cumsum([0, *sizes])
    assert predict_responses(reqs, m, scores) == [
        predict_response(r, m, scores[a:e]) for r, a, e in zip(reqs, starts, starts[1:], strict=False)]
