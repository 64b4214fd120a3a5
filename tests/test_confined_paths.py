"""Confined paths (issue 11, item 2): a shard reads and writes checkpoints only under its checkpoint root,
the gateway loads packages only from its model store; escapes are INVALID_ARGUMENT naming the field and
change nothing; every OSError gets a precise status, never INTERNAL."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import grpc
import pytest
import torch

from inference_gateway.client import GatewayClient
from inference_gateway.process import launch as launch_gateway
from protos.paths import PathRefused, confine, status_of_oserror
from tests.test_inference_package import TINY, tiny_model
from trainer.export import export_package, table_dtypes

TABLES = [{"name": "t", "num_rows": 64, "dim": 8, "features": ["f"],
           "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.1}}]
LONG = "x" * 300


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# -- the shared functions --------------------------------------------------------------------------
def test_confine_resolves_under_the_root_and_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "inside-link").symlink_to(root / "sub")
    assert confine(root, "a/b", "directory") == root.resolve() / "a" / "b"
    assert confine(root, str(root / "sub" / "c"), "directory") == root.resolve() / "sub" / "c"
    assert confine(root, "inside-link/c", "directory") == root.resolve() / "sub" / "c"  # a symlink that stays in
    for name, needle in (("../../etc/passwd", "'..'"), ("a/../../x", "'..'"), ("/etc/passwd", "outside"),
                         (str(outside / "x"), "outside"), ("escape", "outside"), ("escape/deeper", "outside"),
                         (LONG, "too long"), ("", "empty"), ("a\x00b", "NUL")):
        with pytest.raises(PathRefused) as e:
            confine(root, name, "directory")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert e.value.message.startswith("directory: ") and needle in e.value.message, e.value.message
        assert LONG not in e.value.message  # a long name is not echoed whole
    assert tree(outside) == set()


@pytest.mark.parametrize(("err", "code"), [
    (errno.ENOENT, grpc.StatusCode.NOT_FOUND),
    (errno.ENOTDIR, grpc.StatusCode.FAILED_PRECONDITION),
    (errno.EEXIST, grpc.StatusCode.FAILED_PRECONDITION),
    (errno.ENAMETOOLONG, grpc.StatusCode.INVALID_ARGUMENT),
    (errno.EINVAL, grpc.StatusCode.INVALID_ARGUMENT),
    (errno.ENOSPC, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errno.EDQUOT, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errno.EACCES, grpc.StatusCode.PERMISSION_DENIED),
    (errno.EPERM, grpc.StatusCode.PERMISSION_DENIED),
    (errno.EROFS, grpc.StatusCode.PERMISSION_DENIED),
    (errno.EIO, grpc.StatusCode.UNAVAILABLE),
    (errno.ENOTSUP, grpc.StatusCode.FAILED_PRECONDITION),  # anything else: still not INTERNAL
])
def test_every_oserror_maps_to_a_precise_status(err, code):
    refused = status_of_oserror(OSError(err, os.strerror(err), "/srv/secret/path"), "directory", "ck")
    assert refused.code == code
    assert refused.message.startswith("directory 'ck': ") and errno.errorcode[err] in refused.message
    assert "/srv/secret" not in refused.message  # the server's own paths stay out of the answer


# -- the shard -------------------------------------------------------------------------------------
def test_shard_checkpoints_only_under_its_root(shard_factory, tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "afile").write_text("a file where a directory is expected")
    _, client = shard_factory({"tables": TABLES, "shard_id": 0, "checkpoint_root": str(root)})
    before = client.lookup_rows("t", torch.arange(64))
    assert client.checkpoint("good", step=3).bytes_written > 0
    assert client.checkpoint(str(root / "abs"), step=3).bytes_written > 0  # absolute, inside: fine
    snapshot = tree(tmp_path)
    for name in ("../../etc/passwd", "../outside/x", str(outside / "x"), "/etc/passwd-x", "escape", "escape/x",
                 LONG, f"sub/{LONG}"):
        for call in (lambda n=name: client.checkpoint(n, step=4), lambda n=name: client.restore(n)):
            e = rpc_error(call)
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.code(), e.details())
            assert e.details().startswith("directory: "), e.details()
    # a file where a directory is expected: the caller's precondition, named, not INTERNAL
    e = rpc_error(lambda: client.checkpoint("afile", step=4))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "directory 'afile'" in e.details(), e.details()
    e = rpc_error(lambda: client.checkpoint("afile/ck", step=4))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "ENOTDIR" in e.details(), e.details()
    e = rpc_error(lambda: client.restore("missing"))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "manifest.json" in e.details()
    assert tree(tmp_path) == snapshot, "a refused request wrote nothing anywhere"
    assert tree(outside) == set()
    assert torch.equal(client.lookup_rows("t", torch.arange(64)), before), "and changed nothing"
    assert client.restore("good").step == 3 and client.restore(str(root / "abs")).step == 3


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (a disk that fills); skipped where mounting is not allowed."""
    mnt = tmp_path / "root" / "small"
    mnt.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_shard_full_disk_is_resource_exhausted_and_leaves_nothing(shard_factory, small_tmpfs):
    big = [{**TABLES[0], "num_rows": 8192, "dim": 32}]  # 1 MiB of weights: does not fit 256 KiB
    _, client = shard_factory({"tables": big, "shard_id": 0, "checkpoint_root": str(small_tmpfs.parent)})
    assert client.checkpoint("ok", step=1).bytes_written > 0
    e = rpc_error(lambda: client.checkpoint("small/ck", step=2))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
    assert e.details().startswith("directory 'small/ck'") and "ENOSPC" in e.details()
    assert tree(small_tmpfs) == set(), "the failed checkpoint removed what it wrote"
    assert client.restore("ok").step == 1  # the shard goes on; the earlier checkpoint is intact


# -- the gateway -----------------------------------------------------------------------------------
def test_gateway_loads_only_from_its_model_store(tmp_path):
    store = tmp_path / "store"
    outside = tmp_path / "outside"
    export_package(tiny_model(0), store / "v1", dtypes=table_dtypes(TINY, "fp32", []), version=1)
    export_package(tiny_model(1), outside / "v2", dtypes=table_dtypes(TINY, "fp32", []), version=2)
    (store / "escape").symlink_to(outside / "v2")
    gw = launch_gateway(["--model-store", str(store)], workdir=tmp_path / "gw")
    try:
        with GatewayClient(gw.address) as client:
            for name in ("../outside/v2", "../../etc/passwd", str(outside / "v2"), "escape", LONG):
                e = rpc_error(lambda n=name: client.load_model(n))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.details())
                assert e.details().startswith("path: "), e.details()
            e = rpc_error(lambda: client.load_model("missing"))
            assert e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
            assert "path" in e.details()
            assert list(client.list_models()) == []
            assert client.load_model("v1").version == 1  # a name under the store
            assert client.load_model(str(store / "v1"), version=3).version == 3  # an absolute path inside it
    finally:
        gw.kill()
