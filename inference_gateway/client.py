"""Python client of the gateway: builds PredictRequests from arrays or JSON samples, and manages models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from protos import common_pb2, inference_pb2, inference_pb2_grpc
from protos.channels import ChannelClient, open_channel
from protos.security import bearer_metadata

MAX_MESSAGE_BYTES = 64 << 20


def _tensor(a: np.ndarray, dtype: int) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=dtype, shape=list(a.shape), data=np.ascontiguousarray(a).tobytes())


def build_request(dense: Any, lengths: Any, values: Any, *, features: Sequence[str] = (), model: str = "",
                  version: int = 0, request_id: str = "") -> inference_pb2.PredictRequest:
    """dense [B, D] float32; lengths [F * B] feature-major; values ids (int64 unless already int32)."""
    dense = np.asarray(dense, dtype=np.float32)
    lengths = np.asarray(lengths)
    values = np.asarray(values)
    ldt = common_pb2.INT32 if lengths.dtype == np.int32 else common_pb2.INT64
    vdt = common_pb2.INT32 if values.dtype == np.int32 else common_pb2.INT64
    return inference_pb2.PredictRequest(
        model=model, version=version, dense=_tensor(dense, common_pb2.FLOAT32), features=list(features),
        lengths=_tensor(lengths.astype(np.int32 if ldt == common_pb2.INT32 else np.int64, copy=False), ldt),
        values=_tensor(values.astype(np.int32 if vdt == common_pb2.INT32 else np.int64, copy=False), vdt),
        request_id=request_id)


def request_from_json(obj: Mapping[str, Any]) -> inference_pb2.PredictRequest:
    """{"dense": [[...], ...], "sparse": {"feature": [[ids of sample 0], [ids of sample 1], ...], ...},
    optional "model", "version", "request_id"}. A single sample may drop the outer lists."""
    dense = np.asarray(obj["dense"], dtype=np.float32)
    if dense.ndim == 1:
        dense = dense[None, :]
    batch = dense.shape[0]
    names, lengths, values = [], [], []
    for name, bags in obj["sparse"].items():
        if batch == 1 and (not bags or not isinstance(bags[0], list)):
            bags = [bags]
        if len(bags) != batch:
            raise ValueError(f"sparse.{name}: {len(bags)} bags for {batch} samples")
        names.append(name)
        for bag in bags:
            lengths.append(len(bag))
            values.extend(bag)
    return build_request(dense, np.asarray(lengths, dtype=np.int64), np.asarray(values, dtype=np.int64),
                         features=names, model=obj.get("model", ""), version=int(obj.get("version", 0)),
                         request_id=str(obj.get("request_id", "")))


def scores_of(resp: inference_pb2.PredictResponse) -> np.ndarray:
    return np.frombuffer(resp.scores.data, dtype=np.float32)


class GatewayClient(ChannelClient):
    """`token`: the gateway's control-plane token (LoadModel, UnloadModel, SetDefaultVersion);
    `predict_token`: sent with Predict when the gateway requires one; `tls_cert` / `tls_key`: this
    client's certificate for a gateway that requires mutual TLS."""

    def __init__(self, address: str, max_message_bytes: int = MAX_MESSAGE_BYTES, tls_ca: str | None = None, *,
                 token: str | None = None, predict_token: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        self.address = address
        self._auth = bearer_metadata(token) if token else None
        self._predict_auth = bearer_metadata(predict_token) if predict_token else None
        self.channel = open_channel(address, tls_ca=tls_ca, max_message_bytes=max_message_bytes, tls_cert=tls_cert,
                                    tls_key=tls_key)
        self.stub = inference_pb2_grpc.InferenceGatewayStub(self.channel)

    def predict(self, dense: Any, lengths: Any, values: Any, *, timeout: float | None = 30.0,
                **kwargs: Any) -> np.ndarray:
        return scores_of(self.stub.Predict(build_request(dense, lengths, values, **kwargs), timeout=timeout,
                                           metadata=self._predict_auth))

    def predict_request(self, req: inference_pb2.PredictRequest,
                        timeout: float | None = 30.0) -> inference_pb2.PredictResponse:
        return self.stub.Predict(req, timeout=timeout, metadata=self._predict_auth)

    def list_models(self) -> list[inference_pb2.ModelInfo]:
        return list(self.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=30).models)

    def load_model(self, path: str, name: str = "", version: int = 0,
                   make_default: bool = False) -> inference_pb2.ModelInfo:
        return self.stub.LoadModel(inference_pb2.LoadModelRequest(path=path, name=name, version=version,
                                                                  make_default=make_default), timeout=300,
                                   metadata=self._auth)

    def unload_model(self, name: str, version: int) -> None:
        self.stub.UnloadModel(inference_pb2.UnloadModelRequest(name=name, version=version), timeout=300,
                              metadata=self._auth)

    def set_default_version(self, name: str, version: int) -> inference_pb2.ModelInfo:
        return self.stub.SetDefaultVersion(inference_pb2.SetDefaultVersionRequest(name=name, version=version),
                                           timeout=30, metadata=self._auth)
