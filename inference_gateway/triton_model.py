"""The model's compute inside Triton's Python-backend worker processes (one per instance).

tritonserver's C++ frontend accepts, batches (dynamic batcher) and answers requests; each worker gets
a whole batch of requests here, checks each one with `serve`'s own checks (requests.feature_bags and
validate, so a bad request gets the same INVALID_ARGUMENT message on both servers), scores all good
ones in one TBE call and one dense forward, and answers each. Tensors cross as DLPack only: the stub's
numpy conversion is built for numpy 1.x and silently returns empty outputs under numpy 2
(benchmarks/gateway_frontend.md).

Inputs are `serve`'s Open Inference Protocol schema in its batched form (the only one Triton's
batch-size check lets through): `dense` FP32 [B, dense_features]; per feature `<f>.lengths` INT64
[B, 1] and `<f>.values` INT64 [B, K] (ragged: K differs between requests of one batch; row b holds
bag b in its first lengths[b] entries). Output `scores` FP32 [B, 1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from inference_gateway.batching import merge
from inference_gateway.model import ServingModel
from inference_gateway.package import load_package
from inference_gateway.requests import (
    Decoded,
    Limits,
    RequestError,
    feature_bags,
    lengths_input,
    validate,
    values_input,
)

DENSE, SCORES = "dense", "scores"


class BatchScorer:
    """What a worker holds: the package's model with its tables mapped from the shared image."""

    def __init__(self, package: str | Path, table_image: str | Path, max_batch_size: int) -> None:
        torch.set_num_threads(1)  # one core per worker; workers are the parallelism
        self.model = ServingModel(load_package(package, read_tables=False), table_image=table_image)
        self.pairs = [(lengths_input(f), values_input(f)) for f in self.model.features]
        self.limits = Limits(max_request_samples=max_batch_size)  # Triton refuses larger requests first

    def decode(self, arrays: dict[str, np.ndarray]) -> Decoded:
        """One request's inputs (Triton already checked names, datatypes, ranks and batch sizes) ->
        `serve`'s Decoded; RequestError with serve's message otherwise."""
        dense = arrays[DENSE]
        batch = dense.shape[0]

        def sparse() -> tuple[np.ndarray, np.ndarray, bool]:
            return feature_bags(self.pairs, [arrays[ln] for ln, _ in self.pairs], [arrays[vn] for _, vn in self.pairs],
                                batch)

        parts: list[tuple[np.ndarray, np.ndarray, bool]] = []

        def part(k: int) -> np.ndarray:
            if not parts:
                parts.append(sparse())
            return parts[0][k]

        return validate(dense, [], lambda: part(0), lambda: part(1), self.model, self.limits)

    def scores(self, reqs: list[Decoded]) -> torch.Tensor:
        """P(click) [sum of B] for validated requests, in request order."""
        return self.model.scores(*merge(reqs))


def make_triton_model(package: str | Path, table_image: str | Path) -> type:
    """The `TritonPythonModel` class the repository's model.py exports (pb_utils exists only in a stub)."""
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args: dict[str, Any]) -> None:
            config = json.loads(args["model_config"])
            self.scorer = BatchScorer(package, table_image, int(config["max_batch_size"]))
            self.names = [DENSE, *(n for pair in self.scorer.pairs for n in pair)]

        def execute(self, requests: list[Any]) -> list[Any]:
            answers: list[Any] = [None] * len(requests)
            good: list[int] = []
            decoded: list[Decoded] = []
            for i, r in enumerate(requests):
                try:
                    arrays = {n: from_dlpack(pb_utils.get_input_tensor_by_name(r, n).to_dlpack()).numpy()
                              for n in self.names}
                    decoded.append(self.scorer.decode(arrays))
                    good.append(i)
                except RequestError as e:
                    answers[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(e.message, pb_utils.TritonError.INVALID_ARG))
            if not good:
                return answers
            s = self.scorer.scores(decoded)
            start = 0
            for i, d in zip(good, decoded, strict=True):
                n = d.batch_size
                part = s[start:start + n].reshape(n, 1)
                start += n
                answers[i] = pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(SCORES, to_dlpack(part))])
            return answers

    return TritonPythonModel
