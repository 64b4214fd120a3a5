"""The model's compute inside Triton's Python-backend worker processes (one per instance).

tritonserver's C++ frontend accepts, batches (dynamic batcher) and answers requests; each worker gets
a whole batch of requests here, checks each one, scores all good ones in one TBE call and one dense
forward, and answers each. Tensors cross as DLPack only: the stub's numpy conversion is built for
numpy 1.x and silently returns empty outputs under numpy 2 (benchmarks/gateway_frontend.md).

Inputs per sample (single-hot, the W1 shape): `dense` FP32 [dense_features] and `ids` INT64
[len(features)] in the package's feature order; output `score` FP32 [1]. Multi-hot features need
ragged batching and stay on the Predict API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from inference_gateway.model import ServingModel
from inference_gateway.package import load_package

DENSE, IDS, SCORE = "dense", "ids", "score"


class BadInput(ValueError):
    """One request's input is unusable; the message names the input and why (INVALID_ARG)."""


class BatchScorer:
    """What a worker holds: the package's model with its tables mapped from the shared image."""

    def __init__(self, package: str | Path, table_image: str | Path) -> None:
        torch.set_num_threads(1)  # one core per worker; workers are the parallelism
        self.model = ServingModel(load_package(package, read_tables=False), table_image=table_image)
        self.rows = torch.from_numpy(self.model.rows_per_feature)
        self.nfeat, self.ndense = len(self.model.features), self.model.dense_features

    def check_shapes(self, dense: torch.Tensor, ids: torch.Tensor) -> None:
        """Per request, attribute checks only (no tensor ops: they cost microseconds each)."""
        if dense.dim() != 2 or dense.shape[1] != self.ndense or dense.dtype != torch.float32:
            raise BadInput(f"{DENSE}: expected FP32 [B, {self.ndense}], got {dense.dtype} {list(dense.shape)}")
        if ids.dim() != 2 or ids.shape[1] != self.nfeat or ids.dtype != torch.int64:
            raise BadInput(f"{IDS}: expected INT64 [B, {self.nfeat}], got {ids.dtype} {list(ids.shape)}")
        if ids.shape[0] != dense.shape[0]:
            raise BadInput(f"{IDS}: batch {ids.shape[0]} differs from {DENSE}'s {dense.shape[0]}")

    def check_values(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The ids to look up ([B, F]); out-of-range ids are refused or, if the package says so, become
        -1 (dropped: a zero row in the sum). Runs once per batch; on a refusal, per request to find it."""
        if not bool(torch.isfinite(dense).all()):
            raise BadInput(f"{DENSE}: NaN or infinite value")
        bad = (ids < 0) | (ids >= self.rows)
        if bool(bad.any()):
            if self.model.package.out_of_range != "zero":
                b, f = (int(x) for x in bad.nonzero()[0])
                raise BadInput(f"{IDS}: id {int(ids[b, f])} of feature {self.model.features[f]!r} is out of range "
                               f"[0, {int(self.rows[f])})")
            ids = ids.masked_fill(bad, -1)
        return ids

    def scores(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """P(click) [B] for checked inputs (ids [B, F], -1: dropped)."""
        values = ids.t().reshape(-1)  # feature-major bags of one id each
        lengths = (values >= 0).to(torch.int64)
        return self.model.scores(dense, lengths, values[values >= 0])


def make_triton_model(package: str | Path, table_image: str | Path) -> type:
    """The `TritonPythonModel` class the repository's model.py exports (pb_utils exists only in a stub)."""
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args: dict[str, Any]) -> None:
            self.scorer = BatchScorer(package, table_image)

        def execute(self, requests: list[Any]) -> list[Any]:
            answers: list[Any] = [None] * len(requests)
            good, denses, idss = [], [], []
            for i, r in enumerate(requests):
                try:
                    d, x = (pb_utils.get_input_tensor_by_name(r, n) for n in (DENSE, IDS))
                    if d is None or x is None:
                        raise BadInput(f"{DENSE if d is None else IDS}: missing input")
                    dense, ids = from_dlpack(d.to_dlpack()), from_dlpack(x.to_dlpack())
                    self.scorer.check_shapes(dense, ids)
                    denses.append(dense)
                    idss.append(ids)
                    good.append(i)
                except BadInput as e:
                    answers[i] = _refusal(e)
            if not good:
                return answers
            dense, ids = torch.cat(denses), torch.cat(idss)
            try:
                ids = self.scorer.check_values(dense, ids)
            except BadInput:  # find the bad requests; score the others
                keep = []
                for k, i in enumerate(good):
                    try:
                        idss[k] = self.scorer.check_values(denses[k], idss[k])
                        keep.append(k)
                    except BadInput as e:
                        answers[i] = _refusal(e)
                good, denses, idss = [good[k] for k in keep], [denses[k] for k in keep], [idss[k] for k in keep]
                if not good:
                    return answers
                dense, ids = torch.cat(denses), torch.cat(idss)
            s = self.scorer.scores(dense, ids)
            start = 0
            for k, i in enumerate(good):
                n = denses[k].shape[0]
                part = s[start:start + n].reshape(n, 1)
                start += n
                answers[i] = pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(SCORE, to_dlpack(part))])
            return answers

    def _refusal(e: BadInput) -> Any:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))

    return TritonPythonModel
