"""Online freshness on serve-triton (`--follow`): a follower process writes the shards' row deltas and the
dense publishes into the followed version's shared table image; tritonserver's worker processes serve
them, and no worker's batch ever sees a delta entry half applied (image_state's sequence lock)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from inference_gateway.client import GatewayClient, scores_of
from inference_gateway.image_state import ImageState
from inference_gateway.model import ServingModel
from inference_gateway.process import launch_triton
from inference_gateway.shared_tables import write_image
from protos.package import load_package
from tests import prom
from tests.test_freshness import (  # noqa: F401 - redis_server and shard are fixtures
    expected_scores,
    export_from_shard,
    redis_server,
    requests,
    shard,
    train,
    trained_past_a_trimmed_stream,
    wait_applied,
)
from tests.test_inference_package import ROOT, TINY
from trainer.data import SyntheticData
from trainer.dense_publisher import DensePublisher
from trainer.export import ExportedModel, export_package, table_dtypes
from trainer.model import DenseDLRM


@pytest.mark.timeout(300)
def test_serve_triton_follows_row_deltas_and_dense_publishes_in_every_worker(shard, redis_server, tmp_path):  # noqa: F811
    base = export_from_shard(shard, tmp_path / "base", step=-1)
    gw = launch_triton(["--model", str(base), "--follow", redis_server.url, "--metrics-port", "-1", "--workers", "2",
                        "--model-store", str(tmp_path)], workdir=tmp_path / "gw")
    try:
        assert gw.announced["follow"] and gw.announced["follower_pid"]
        with GatewayClient(f"127.0.0.1:{gw.announced['management_port']}") as mgmt, \
                GatewayClient(f"127.0.0.1:{gw.announced['predict_port']}") as c:
            before = [scores_of(c.predict_request(r)) for r in requests()]
            train(shard, 0, 20)
            steps = wait_applied(mgmt, 19)
            assert set(steps) == {t.name for t in TINY.tables}
            want = expected_scores(export_from_shard(shard, tmp_path / "at19", step=19))
            assert not all(np.allclose(b, w) for b, w in zip(before, want, strict=True))  # training moved them
            for _ in range(3):  # two workers: each request several times, so both serve it
                for req, exp in zip(requests(), want, strict=True):
                    np.testing.assert_allclose(scores_of(c.predict_request(req)), exp, rtol=1e-5, atol=1e-6)
            newer = DenseDLRM(TINY, seed=5)
            publisher = DensePublisher(redis_server.url, every=4)
            publisher.maybe_publish(23, newer)
            publisher.close()
            assert wait_applied(mgmt, 23, part="dense") == {"dense": 23}
            want = expected_scores(export_from_shard(shard, tmp_path / "dense", step=19, dense=newer))
            for _ in range(3):
                for req, exp in zip(requests(), want, strict=True):
                    np.testing.assert_allclose(scores_of(c.predict_request(req)), exp, rtol=1e-5, atol=1e-6)
            # a newer version of the model (exported at step 19) takes the deltas from there on
            export_from_shard(shard, tmp_path / "v2", step=19, version=2, dense=newer)
            mgmt.load_model("v2")
            train(shard, 20, 5)
            assert [(i.version, i.is_default) for i in mgmt.list_models()] == [(1, False), (2, True)]
            wait_applied(mgmt, 24)
            want = expected_scores(export_from_shard(shard, tmp_path / "at24", step=24, dense=newer))
            for _ in range(3):
                for req, exp in zip(requests(), want, strict=True):
                    np.testing.assert_allclose(scores_of(c.predict_request(req)), exp, rtol=1e-5, atol=1e-6)
            live = tmp_path / "gw" / "triton" / "live"
            assert (live / "dlrm-v1.tbe").exists() and (live / "dlrm-v2.tbe.state").exists()
            # the deltas went to the versions' private copies: the cached image is still the package's bytes
            tables = tmp_path / "gw" / "triton" / "tables"
            [cached] = tables.glob("dlrm-v1-*.tbe")
            assert cached.read_bytes() == write_image(load_package(base), tmp_path / "fresh").read_bytes()
            mgmt.unload_model("dlrm", 1)  # a version unloaded leaves no image behind, private or cached
            assert sorted(p.name for p in live.iterdir()) == ["dlrm-v2.tbe", "dlrm-v2.tbe.dense.pt",
                                                             "dlrm-v2.tbe.follow.json", "dlrm-v2.tbe.state"]
            assert [p.name.split("-")[1] for p in tables.glob("*.tbe")] == ["v2"]
    finally:
        gw.kill()


@pytest.mark.timeout(300)
def test_a_gap_rewrites_the_image_from_a_snapshot_and_a_killed_follower_is_replaced(shard, redis_server,  # noqa: F811
                                                                                     tmp_path):
    base, snapshots = trained_past_a_trimmed_stream(shard, redis_server, tmp_path)
    gw = launch_triton(["--model", str(base), "--follow", redis_server.url, "--snapshots", str(snapshots),
                        "--workers", "1"], workdir=tmp_path / "gw")
    follower_metrics = gw.announced["follower_metrics_port"]
    try:
        with GatewayClient(f"127.0.0.1:{gw.announced['management_port']}") as mgmt, \
                GatewayClient(f"127.0.0.1:{gw.announced['predict_port']}") as c:
            wait_applied(mgmt, 19)
            [info] = mgmt.list_models()
            assert info.version == 1, "serve-triton rewrites the followed image in place"
            want = expected_scores(export_from_shard(shard, tmp_path / "at19", step=19))
            for req, exp in zip(requests(), want, strict=True):
                np.testing.assert_allclose(scores_of(c.predict_request(req)), exp, rtol=1e-5, atol=1e-6)
            assert "resync: image rewritten from" in (tmp_path / "gw" / "triton" / "follower.log").read_text()
            assert prom.value(follower_metrics, "delta_gaps_total") >= 1
            assert prom.value(follower_metrics, "delta_resyncs_total") == 1
            assert prom.value(follower_metrics, "delta_lag_seconds_count") > 0
            os.kill(gw.announced["follower_pid"], signal.SIGKILL)
            train(shard, 20, 5)  # the supervisor starts another follower, which catches up
            wait_applied(mgmt, 24)
            assert prom.value(follower_metrics, "delta_applied_step", table="users") >= 24  # the new one, same port
            # it continued from the position the first one saved: no replay from the package's step, no resync
            assert prom.value(follower_metrics, "delta_resyncs_total") == 0
            assert "continuing from the saved position (snapshot step 9)" in \
                (tmp_path / "gw" / "triton" / "follower.log").read_text()
            want = expected_scores(export_from_shard(shard, tmp_path / "at24", step=24))
            for req, exp in zip(requests(), want, strict=True):
                np.testing.assert_allclose(scores_of(c.predict_request(req)), exp, rtol=1e-5, atol=1e-6)
        assert "the delta follower exited" in gw.log_text()
    finally:
        gw.kill()


READER = """
import json, sys, time, numpy as np, torch
from inference_gateway.model import ServingModel
from protos.package import load_package
from trainer.data import SyntheticData
from tests.test_inference_package import TINY
torch.set_num_threads(1)
model = ServingModel(load_package(sys.argv[1], read_tables=False), table_image=sys.argv[2])
b = SyntheticData(TINY, seed=3, pooling_factor=20).batch(0, 64)
seen, until = [], time.monotonic() + float(sys.argv[3])
print("ready", flush=True)
while time.monotonic() < until:
    seen.append(model.scores(b.dense, b.sparse.lengths, b.sparse.values).numpy().tolist())
print(json.dumps(seen), flush=True)
"""


def test_a_reader_process_never_scores_a_half_written_delta(tmp_path):
    """The follower's sequence lock across processes: a reader process scores in a loop while this process
    (the writer) rewrites every row of one table from A to B and back, one entry at a time; every score
    vector it got is exactly A's or B's, never a mix."""
    g = torch.Generator().manual_seed(0)
    tables = {t.name: torch.randn(t.num_rows, t.dim, generator=g) for t in TINY.tables}
    pkg = export_package(ExportedModel(TINY, DenseDLRM(TINY, seed=0), tables, 0), tmp_path / "p",
                         dtypes=table_dtypes(TINY, "int8", []))
    image = tmp_path / "live.tbe"
    shutil.copyfile(write_image(load_package(pkg), tmp_path / "cache"), image)
    ImageState.create(image)
    writer = ServingModel(load_package(pkg, read_tables=False), table_image=image, writer=True)
    items = TINY.table("items")
    rows_a = torch.randn(items.num_rows, items.dim, generator=g).numpy()
    rows_b = torch.randn(items.num_rows, items.dim, generator=g).numpy()
    ids = np.arange(items.num_rows)
    b = SyntheticData(TINY, seed=3, pooling_factor=20).batch(0, 64)
    writer.apply_rows("items", ids, rows_a)
    score_a = writer.scores(b.dense, b.sparse.lengths, b.sparse.values).numpy()
    writer.apply_rows("items", ids, rows_b)
    score_b = writer.scores(b.dense, b.sparse.lengths, b.sparse.values).numpy()
    assert not np.allclose(score_a, score_b)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(pkg), str(image), "4"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        assert reader.stdout.readline().strip() == "ready", reader.stderr.read()[-3000:]
        writes = 0
        until = time.monotonic() + 3.5
        while time.monotonic() < until:
            writer.apply_rows("items", ids[::-1], (rows_a if writes % 2 else rows_b)[::-1])  # one entry: every row
            writes += 1
        out, err = reader.communicate(timeout=60)
    finally:
        reader.kill()
    seen = [np.asarray(s, dtype=np.float32) for s in json.loads(out.strip().splitlines()[-1])]
    bad = [s for s in seen if not (np.array_equal(s, score_a) or np.array_equal(s, score_b))]
    assert len(seen) > 20 and writes > 20, (len(seen), writes, err[-2000:])
    assert not bad, f"{len(bad)} of {len(seen)} batches saw a half-applied delta"
    got_a = sum(np.array_equal(s, score_a) for s in seen)
    assert 0 < got_a < len(seen), "the reader saw only one side: the writes did not reach it"


DIES_MID_WRITE = """
import sys, time
from inference_gateway.image_state import ImageState
state = ImageState(sys.argv[1], writable=True)
with state.write():
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_writer_killed_mid_write_holds_readers_until_recovered(tmp_path):
    """kill -9 of the follower inside a write leaves the sequence odd: readers wait (they must not take half
    a write for a whole one) until the supervisor, seeing the follower gone, recovers the state."""
    image = tmp_path / "live.tbe"
    image.write_bytes(bytes(64))
    ImageState.create(image)
    writer = subprocess.Popen([sys.executable, "-c", DIES_MID_WRITE, str(image)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.kill()
        writer.wait(30)
    reader = ImageState(image)
    done = threading.Event()
    threading.Thread(target=lambda: (reader.read(lambda: None), done.set()), daemon=True).start()
    assert not done.wait(0.5), "a reader took a write its writer never finished"
    assert ImageState(image, writable=True).recover() is True
    assert done.wait(5), "the reader still waits after the recovery"
    assert ImageState(image, writable=True).recover() is False  # even: nothing to recover
