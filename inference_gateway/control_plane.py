"""The gateways' control plane, one definition for `serve` (servicer.py) and `serve-triton`
(triton_frontend.py): which RPCs need the control token, and the checks a LoadModel request passes
before anything is read, so both servers refuse the same request with the same status."""

from __future__ import annotations

from pathlib import Path

import grpc

from protos import inference_pb2
from protos.paths import PathRefused, confine

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceGateway"].full_name
# loads a package, unloads or switches a version: a bearer token (--token-file) and/or mTLS
CONTROL_PLANE = ("LoadModel", "UnloadModel", "SetDefaultVersion")
PREDICT = ("Predict", "PredictStream")  # open unless --predict-token-file


def load_path(request: inference_pb2.LoadModelRequest, model_store: str | Path) -> Path:
    """The package directory a LoadModel request names, resolved inside the model store; PathRefused
    (INVALID_ARGUMENT naming the field) for a missing path, a negative version or a path outside the
    store. Nothing is read yet."""
    if not request.path:
        raise PathRefused(grpc.StatusCode.INVALID_ARGUMENT, "path: required")
    if request.version < 0:
        raise PathRefused(grpc.StatusCode.INVALID_ARGUMENT, "version: must be >= 0")
    return confine(model_store, request.path, "path", what="model store")
