"""serve-triton's control plane on real processes (issue 12's credentials): the management port wants
the control token (and serves TLS when configured), LoadModel reads only inside --model-store, and
Triton's own port refuses its repository API to anyone but the supervisor, so nobody who reaches
it can load, replace or unload a model (RepositoryModelLoad with a `file:1/model.py` override would
run that file in a worker)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritonclient

from inference_gateway.client import GatewayClient, build_request, scores_of
from inference_gateway.process import launch_triton
from inference_gateway.triton_frontend import ADMIN_HEADER
from tests.test_credentials import TOKEN, code_of, gateway_control_calls, token_file
from tests.test_inference_package import TINY, tiny_model
from tests.test_oip import ragged
from trainer.export import export_package, table_dtypes

RESTRICTED = "This protocol is restricted"  # Triton's answer (UNAVAILABLE) without the supervisor's header


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for version in (1, 2):
        export_package(tiny_model(version - 1), root / f"v{version}", dtypes=table_dtypes(TINY, "int8", []),
                       version=version)
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A valid package that is not in the model store."""
    path = tmp_path_factory.mktemp("elsewhere") / "v3"
    export_package(tiny_model(2), path, dtypes=table_dtypes(TINY, "int8", []), version=3)
    return path


@pytest.fixture(scope="module")
def gw(store, certs, tmp_path_factory):
    wd = tmp_path_factory.mktemp("gw")
    g = launch_triton(["--model", "v1", "--workers", "1", "--model-store", str(store),
                       "--token-file", token_file(wd, TOKEN), "--tls-cert", certs["cert"], "--tls-key", certs["key"]],
                      workdir=wd / "run")
    yield g
    g.kill()
    with contextlib.suppress(ProcessLookupError):
        os.kill(g.announced["triton_pid"], signal.SIGKILL)


def management(g, certs, token: str | None = None) -> GatewayClient:
    return GatewayClient(f"127.0.0.1:{g.announced['management_port']}", tls_ca=certs["ca"], token=token)


def listed(client: GatewayClient) -> list[tuple[str, int, bool]]:
    return [(m.name, m.version, m.is_default) for m in client.list_models()]


def repository(g) -> list[str]:
    """The models and version directories in tritonserver's model repository."""
    root = g.workdir / "triton" / "repository"
    return sorted(str(v.relative_to(root)) for v in root.glob("*/*") if v.is_dir() and v.name != "__pycache__")


def test_management_needs_the_control_token_over_tls_and_loads_only_from_the_store(gw, certs, outside):
    assert (gw.announced["control_token"], gw.announced["tls"], gw.announced["mtls"]) == (True, True, False)
    with grpc.insecure_channel(f"127.0.0.1:{gw.announced['management_port']}") as plain:
        with pytest.raises(grpc.RpcError) as e:
            plain.unary_unary("/recsys.v1.InferenceGateway/ListModels")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port fails the handshake
    before = [("dlrm", 1, True)]
    images = gw.workdir / "triton" / "tables"
    with management(gw, certs) as anonymous, management(gw, certs, "not-" + TOKEN) as wrong:
        assert listed(anonymous) == before  # ListModels (and health) stay open
        for method, call in gateway_control_calls(anonymous).items():
            assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED, method
        for method, call in gateway_control_calls(wrong).items():
            assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED, method
        assert listed(anonymous) == before
    with management(gw, certs, TOKEN) as admin:
        for path, message in ((str(outside), "is an absolute path outside the server's model store"),
                              ("../elsewhere/v3", "must not contain '..'")):
            with pytest.raises(grpc.RpcError) as e:
                admin.load_model(path)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
            assert e.value.details().startswith("path: ") and message in e.value.details(), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            admin.load_model("v2", version=-1)
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "version: must be >= 0")
        assert listed(admin) == before and repository(gw) == ["dlrm/1"]
        assert admin.load_model("v2").version == 2  # the right token works
        assert listed(admin) == [("dlrm", 1, False), ("dlrm", 2, True)]
        assert sorted(p.name.split("-")[1] for p in images.glob("*.tbe")) == ["v1", "v2"]
        admin.unload_model("dlrm", 2)
        assert listed(admin) == before
        assert [p.name.split("-")[1] for p in images.glob("*.tbe")] == ["v1"]  # the unloaded one's image deleted


def test_the_predict_port_serves_tls_with_the_management_ports_certificate(gw, certs):
    """--tls-cert covers --predict-port too (as `serve`'s one port): plaintext fails the handshake, a client
    with the CA lists and scores."""
    address = f"127.0.0.1:{gw.announced['predict_port']}"
    with grpc.insecure_channel(address) as plain:
        with pytest.raises(grpc.RpcError) as e:
            plain.unary_unary("/recsys.v1.InferenceGateway/ListModels")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    dense, lengths, values = ragged(3, 7)
    with GatewayClient(address, tls_ca=certs["ca"]) as client:
        assert listed(client) == [("dlrm", 1, True)]
        scores = scores_of(client.predict_request(build_request(dense, lengths, values), timeout=60))
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))


def _infer_ok(client) -> None:
    dense = tritonclient.InferInput("dense", [1, TINY.dense_features], "FP32")
    dense.set_data_from_numpy(np.zeros((1, TINY.dense_features), np.float32))
    ids = tritonclient.InferInput("ids", [1, len(TINY.features)], "INT64")
    ids.set_data_from_numpy(np.zeros((1, len(TINY.features)), np.int64))
    assert client.infer("dlrm", [dense, ids], client_timeout=60).as_numpy("scores").shape == (1, 1)


def test_triton_port_refuses_its_repository_api_to_clients(gw, tmp_path):
    client = tritonclient.InferenceServerClient(gw.address)
    marker = tmp_path / "ran"
    # an attacker's model.py: runs at import in a worker (unrestricted, Triton loads it and `marker` appears)
    model_py = (f"open({str(marker)!r}, 'w').close()\n\n\nclass TritonPythonModel:\n"
                "    def execute(self, requests):\n        return []\n").encode()
    config = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0,
                         "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
                         "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]})
    before = repository(gw)
    guessed = {ADMIN_HEADER: "guess"}
    attempts = {
        "upload a new model": lambda h: client.load_model("evil", headers=h, config=config,
                                                          files={"file:1/model.py": model_py}),
        "replace dlrm's code": lambda h: client.load_model("dlrm", headers=h,
                                                           files={"file:1/model.py": model_py}),
        "unload dlrm": lambda h: client.unload_model("dlrm", headers=h),
        "index": lambda h: client.get_model_repository_index(headers=h),
        "statistics": lambda h: client.get_inference_statistics(headers=h),
        "log settings": lambda h: client.update_log_settings({"log_verbose_level": 1}, headers=h),
        "shared memory": lambda h: client.unregister_system_shared_memory(headers=h),
    }
    for what, attempt in attempts.items():
        for headers in (None, guessed):
            with pytest.raises(tritonclient.InferenceServerException) as e:
                attempt(headers)
            assert e.value.status() == "StatusCode.UNAVAILABLE" and RESTRICTED in e.value.message(), (what, headers)
    assert not marker.exists()
    assert repository(gw) == before
    assert client.is_model_ready("dlrm") and not client.is_model_ready("evil")
    _infer_ok(client)  # health, metadata and inference stay open
    assert client.get_model_metadata("dlrm").versions == ["1"]


def test_the_supervisors_secret_is_never_written_to_a_file(gw):
    """It is on tritonserver's command line (documented: a local `ps` shows it), and nowhere on disk."""
    argv = Path(f"/proc/{gw.announced['triton_pid']}/cmdline").read_bytes().split(b"\0")
    [flag] = [a for a in argv if a.startswith(b"--grpc-restricted-protocol=")]
    secret = flag.rsplit(b"=", 1)[1]
    assert len(secret) >= 32
    for path in gw.workdir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
