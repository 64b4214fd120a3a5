"""The model's compute inside Triton's Python-backend worker processes (one per instance).

tritonserver's C++ frontend accepts, batches (dynamic batcher) and answers requests; each worker gets
a whole batch of requests here, checks them all at once with `serve`'s own checks (requests.feature_bags
and validate; when that fails, each request alone, so a bad request gets the same INVALID_ARGUMENT
message as on `serve` and spoils no other), scores all good ones in one TBE call and one dense forward,
and answers each. Tensors cross as DLPack only: the stub's numpy conversion is built for numpy 1.x and
silently returns empty outputs (and inputs whose every element reads as the first) under numpy 2
(benchmarks/gateway_frontend.md).

Inputs are `serve`'s Open Inference Protocol schema in its batched form (the only one Triton's
batch-size check lets through): `dense` FP32 [B, dense_features]; per feature `<f>.lengths` INT64
[B, 1] and `<f>.values` INT64 [B, K] (ragged: K differs between requests of one batch; row b holds
bag b in its first lengths[b] entries); or, single-hot, `dense` and `ids` INT64 [B, features] alone;
or, any bags, `dense`, `lengths` INT64 [B, features] and `values` INT64 [B, K] (ragged; row b: sample
b's bags in feature order, then padding). All inputs but dense are optional in the config: Triton's
cost grows ~10 us an input, and a Criteo request in the per-feature form has 53 (3.4x fewer requests/s
than the compact forms at 64 streams). Output `scores` FP32 [B, 1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from inference_gateway.batching import merge
from inference_gateway.model import ServingModel
from inference_gateway.requests import (
    DENSE,
    IDS,
    LENGTHS,
    VALUES,
    Decoded,
    Limits,
    RequestError,
    feature_bags,
    input_set_error,
    lengths_input,
    sample_bags,
    single_hot,
    validate,
    values_input,
)
from protos.package import load_package

SCORES = "scores"
Arrays = dict[str, np.ndarray]  # one request's inputs by name


class BatchScorer:
    """What a worker holds: the package's model with its tables mapped from the shared image."""

    def __init__(self, package: str | Path, table_image: str | Path, max_batch_size: int) -> None:
        torch.set_num_threads(1)  # one core per worker; workers are the parallelism
        self.model = ServingModel(load_package(package, read_tables=False), table_image=table_image)
        self.pairs = [(lengths_input(f), values_input(f)) for f in self.model.features]
        self.limits = Limits(max_request_samples=max_batch_size)  # Triton refuses larger requests first
        self.batch_limits = Limits(max_request_samples=1 << 62, max_request_ids=1 << 62)  # checked per request
        self.model.warm_up()

    def decode(self, arrays: Arrays) -> Decoded:
        """One request's inputs -> serve's Decoded, or RequestError with serve's message."""
        wrong = input_set_error(arrays, self.model)
        if wrong:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, wrong)
        return self._validate([arrays], self.limits)

    def decode_batch(self, requests: list[Arrays]) -> Decoded:
        """Every request as one (a few numpy calls per feature per batch, not per request); RequestError if
        any request is bad (decode each one then to find it and say why). Triton already checked each
        input's datatype, rank and first dimension (its request's batch size), and batches only requests
        with the same set of inputs."""
        if len(requests) == 1:
            return self.decode(requests[0])
        if input_set_error(requests[0], self.model):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "a request lacks inputs")
        if any(sum(a.size for n, a in r.items() if n != DENSE) > self.limits.max_request_ids for r in requests):
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "a request has too many ids")
        return self._validate(requests, self.batch_limits)

    def _validate(self, requests: list[Arrays], limits: Limits) -> Decoded:
        dense = requests[0][DENSE] if len(requests) == 1 else np.concatenate([r[DENSE] for r in requests])
        batch = dense.shape[0]
        parts: list[tuple[np.ndarray, np.ndarray, bool]] = []

        def sparse() -> tuple[np.ndarray, np.ndarray, bool]:
            if IDS in requests[0]:
                return single_hot(_rows([r[IDS] for r in requests]), len(self.pairs), batch)
            if LENGTHS in requests[0]:
                return sample_bags(_rows([r[LENGTHS] for r in requests]), _rows([r[VALUES] for r in requests]),
                                   len(self.pairs), batch)
            return feature_bags(self.pairs, [_rows([r[ln] for r in requests]) for ln, _ in self.pairs],
                                [_rows([r[vn] for r in requests]) for _, vn in self.pairs], batch)

        def part(k: int) -> np.ndarray:  # validate reads the sparse inputs once the dense one passed
            if not parts:
                parts.append(sparse())
            return parts[0][k]

        return validate(dense, [], lambda: part(0), lambda: part(1), self.model, limits)

    def scores(self, reqs: list[Decoded]) -> torch.Tensor:
        """P(click) [sum of B] for validated requests, in request order."""
        return self.model.scores(*merge(reqs))


def _rows(parts: list[np.ndarray]) -> np.ndarray:
    """[B_i, K_i] arrays stacked along B; a narrower one padded with -1 (past its bags: ignored)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.shape[1] for p in parts)
    if any(p.shape[1] != width for p in parts):
        parts = [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-1) for p in parts]
    return np.concatenate(parts)


def make_triton_model(package: str | Path, table_image: str | Path) -> type:
    """The `TritonPythonModel` class the repository's model.py exports (pb_utils exists only in a stub)."""
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args: dict[str, Any]) -> None:
            config = json.loads(args["model_config"])
            self.scorer = BatchScorer(package, table_image, int(config["max_batch_size"]))

        def execute(self, requests: list[Any]) -> list[Any]:
            # a Criteo request has 53 inputs: r.inputs() once costs ~2-3 us an input through DLPack, a
            # get_input_tensor_by_name each ~15-40 us; the stub's as_numpy repeats the first element under numpy 2
            arrays = [{t.name(): from_dlpack(t.to_dlpack()).numpy() for t in r.inputs()} for r in requests]
            answers: list[Any] = [None] * len(requests)
            try:
                good, decoded = list(range(len(requests))), [self.scorer.decode_batch(arrays)]
            except RequestError:  # find the bad requests; score the others
                good, decoded = [], []
                for i, a in enumerate(arrays):
                    try:
                        decoded.append(self.scorer.decode(a))
                        good.append(i)
                    except RequestError as e:
                        answers[i] = pb_utils.InferenceResponse(
                            error=pb_utils.TritonError(e.message, pb_utils.TritonError.INVALID_ARG))
                if not good:
                    return answers
            s = self.scorer.scores(decoded)
            start = 0
            for i in good:
                n = arrays[i][DENSE].shape[0]
                part = s[start:start + n].reshape(n, 1)
                start += n
                answers[i] = pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(SCORES, to_dlpack(part))])
            return answers

    return TritonPythonModel
