"""The coordinator's Kubernetes code (`coordinator serve --kubernetes`) against an HTTP test double of the
Kubernetes API server (`tests/kube_api_double.py`).

No real API server can run on these machines, so the double is the one stand-in these tests use: it
serves the few endpoints the coordinator calls (list/watch pods with resourceVersions and chunked watch
events, 410 on a compacted resourceVersion, GET/PATCH of the StatefulSet's scale subresource, 403s, going
away and coming back) and the official `kubernetes` client talks to it through a generated kubeconfig.
Everything else is real: the coordinator process, Redis, and the shard processes whose ordinals the
double reports.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import pytest

from coordinator.kubernetes import (
    KubeErrorKind,
    KubeSettings,
    ShardPodWatcher,
    StatefulSetScaler,
    api_client,
    ordinal_of,
)
from coordinator.scaling import FixedShards, ScalingError
from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.channels import open_channel
from protos.coordinator_client import final
from protos.shard_client import ShardClient
from tests.kube_api_double import KubeApiDouble

pb = coordinator_pb2
NS = "recsys"


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def double():
    d = KubeApiDouble(namespace=NS, replicas=2).start()
    yield d
    d.stop()


@pytest.fixture
def settings(double, tmp_path) -> KubeSettings:
    return KubeSettings(namespace=NS, kubeconfig=str(double.write_kubeconfig(tmp_path / "kubeconfig")),
                        watch_timeout_s=2, request_timeout_s=3, retry_budget_s=1.5, backoff_max_s=0.3)


@pytest.fixture
def watcher(settings):
    w = ShardPodWatcher(api_client(settings), settings).start()
    assert w.synced.wait(10), w.error
    yield w
    w.stop()


def test_ordinal_is_the_shard_id():
    assert ordinal_of("embedding-shard-0", "embedding-shard") == 0
    assert ordinal_of("embedding-shard-12", "embedding-shard") == 12
    assert ordinal_of("embedding-shard-x", "embedding-shard") is None
    assert ordinal_of("other-embedding-shard-1", "embedding-shard") is None
    assert ordinal_of("embedding-shard-canary-1", "embedding-shard") is None


def test_discovery_lists_then_follows_watch_events(double, watcher):
    pods = watcher.pods()
    assert sorted(pods) == [0, 1]
    assert pods[1].name == "embedding-shard-1" and pods[1].shard_id == 1 and pods[1].ready
    assert pods[1].phase == "Running"
    double.add_foreign_pod("embedding-shard-debug")  # matches the selector, not one of the StatefulSet's
    double.set_pod(1, "Running", ready=False)
    assert watcher.wait_for(lambda p: not p[1].ready, 10)
    double.delete_pod(1)
    assert watcher.wait_for(lambda p: sorted(p) == [0], 10)
    double.add_pod(1, phase="Pending", ready=False)  # the StatefulSet restarts it: a new uid
    assert watcher.wait_for(lambda p: 1 in p and p[1].phase == "Pending", 10)
    assert watcher.lists == 1, "events alone kept the view current"
    watches = [q for m, p, q, _ in double.requests if m == "GET" and q.get("watch") == "true"]
    assert watches and all(q.get("resourceVersion") for q in watches), "every watch starts from a resourceVersion"
    assert watches[0]["resourceVersion"] == "102"  # the list's resourceVersion


def test_watch_relists_after_410_gone(double, watcher, caplog):
    caplog.set_level(logging.INFO, logger="coordinator.kubernetes")
    double.compact()  # the watcher's resourceVersion is now too old; its open watch ends
    wait_until(lambda: watcher.lists >= 2, what="a relist after 410")
    assert "is gone (410): listing again" in caplog.text
    double.add_pod(2)  # the watch resumed from the new list's version
    assert watcher.wait_for(lambda p: 2 in p, 10)
    assert watcher.error is None


def test_scale_up_and_down_through_the_scale_subresource(double, settings, watcher):
    scaler = StatefulSetScaler(api_client(settings), settings, watcher)
    assert scaler.elastic and scaler.replicas() == 2
    scaler.scale_to(4)
    patches = [(p, b) for m, p, _, b in double.requests if m == "PATCH"]
    assert patches == [(f"/apis/apps/v1/namespaces/{NS}/statefulsets/embedding-shard/scale",
                        {"spec": {"replicas": 4}})]
    assert watcher.wait_for(lambda p: sorted(p) == [0, 1, 2, 3], 10)
    assert scaler.replicas() == 4
    scaler.scale_to(2)  # the controller removes the highest ordinals
    assert watcher.wait_for(lambda p: sorted(p) == [0, 1], 10)
    assert double.replicas["embedding-shard"] == 2
    with pytest.raises(ScalingError, match="not found"):
        StatefulSetScaler(api_client(settings), KubeSettings(NS, statefulset="missing", kubeconfig=settings.kubeconfig,
                                                             retry_budget_s=0.5)).scale_to(3)


def test_local_default_does_not_scale():
    fixed = FixedShards()
    assert not fixed.elastic and fixed.replicas() is None
    with pytest.raises(ScalingError, match="--kubernetes"):
        fixed.scale_to(3)


def test_forbidden_is_a_clear_error_logged_once_and_retried(double, settings, caplog):
    caplog.set_level(logging.INFO, logger="coordinator.kubernetes")
    double.forbid |= {"list", "patch"}
    w = ShardPodWatcher(api_client(settings), settings).start()
    try:
        wait_until(lambda: double.count("GET", "/pods") >= 4, what="list retries")
        assert not w.synced.is_set()
        assert w.error is not None and w.error.kind == KubeErrorKind.FORBIDDEN
        text = str(w.error)
        assert "list pods -l app.kubernetes.io/component=embedding-shard in namespace recsys" in text
        assert "403" in text and "needs 'list'" in text
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]  # logged once, however often retried
        scaler = StatefulSetScaler(api_client(settings), settings, w)
        with pytest.raises(ScalingError) as e:
            scaler.scale_to(3)
        assert "patch statefulsets/embedding-shard/scale in namespace recsys" in str(e.value)
        assert "403" in str(e.value) and "needs 'patch'" in str(e.value)
        assert double.count("PATCH", "/scale") >= 2, "a refusal is retried within the budget"
        assert double.replicas["embedding-shard"] == 2
        double.forbid.clear()  # RBAC fixed: the coordinator carries on by itself
        assert w.synced.wait(10) and sorted(w.pods()) == [0, 1]
        wait_until(lambda: w.error is None, what="the error to clear")
        assert "works again" in caplog.text
    finally:
        w.stop()


def test_api_server_going_away_and_coming_back(double, settings, watcher, caplog):
    caplog.set_level(logging.INFO, logger="coordinator.kubernetes")
    scaler = StatefulSetScaler(api_client(settings), settings, watcher)
    double.stop()
    wait_until(lambda: watcher.error is not None, what="the outage to be noticed")
    assert watcher.error.kind == KubeErrorKind.UNREACHABLE
    assert "API server unreachable" in str(watcher.error)
    with pytest.raises(ScalingError, match="unreachable"):
        scaler.scale_to(3)
    double.add_pod(2)  # changes while the API server is away are picked up by the relist
    time.sleep(1.0)
    unreachable = [r for r in caplog.records if r.levelno == logging.ERROR and "unreachable" in r.getMessage()]
    # once for the pod watch and once for the scale request: not once per retry
    assert len(unreachable) == 2, [r.getMessage() for r in unreachable]
    double.start()
    assert watcher.wait_for(lambda p: sorted(p) == [0, 1, 2], 15)
    wait_until(lambda: watcher.error is None, what="the watch to recover")
    scaler.scale_to(3)
    assert double.replicas["embedding-shard"] == 3


# -- a real coordinator process with --kubernetes, real shard processes ------------------------------
def _kube_args(double: KubeApiDouble, tmp_path: Path) -> tuple[str, ...]:
    return ("--kubernetes", "--kubeconfig", str(double.write_kubeconfig(tmp_path / "kubeconfig")),
            "--kube-namespace", NS)


def _play_statefulset_controller(double: KubeApiDouble, job) -> None:
    """A scale PATCH starts standby shard processes for the new ordinals (as the StatefulSet's pods run
    `embedding-shard serve --standby --shard-id <ordinal>`) and stops the removed ones."""

    def on_scale(old: int, new: int) -> None:
        def act() -> None:
            for i in range(old, new):
                job.shards.start(i, None)
            for i in range(new, old):
                proc = job.shards.procs.pop(i, None)
                if proc is not None:
                    proc.terminate()

        threading.Thread(target=act, daemon=True).start()

    double.on_scale = on_scale


class FakeTrainer:
    """A trainer's membership only (register + heartbeat), to stand for a trainer process that is still
    running; stop() is that process exiting."""

    def __init__(self, coordinator: str, rank: int = 0) -> None:
        self.channel = open_channel(coordinator)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.member = pb.Member(kind=pb.TRAINER, id=rank, instance=uuid.uuid4().hex)
        self.stub.Register(pb.RegisterRequest(member=self.member), timeout=10)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(0.3):
            self.stub.Heartbeat(pb.HeartbeatRequest(kind=pb.TRAINER, id=self.member.id,
                                                    instance=self.member.instance), timeout=10)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.channel.close()


def _shard(job, shard: int) -> pb.Member | None:
    return next((m for m in job.client.members() if m.kind == pb.SHARD and m.id == shard and m.state == pb.ALIVE),
                None)


def test_plan_apply_scales_the_statefulset_up_and_down(double, tmp_path):
    from tests.coordinated import PLAN1, PLAN2, Job

    job = Job(tmp_path, *_kube_args(double, tmp_path), standby=0)  # shards 0 and 1 serve PLAN1
    try:
        _play_statefulset_controller(double, job)
        assert not double.count("PATCH", "/scale")
        done = final(job.client.apply(PLAN2, author="test", reason="3 shards"))
        assert done.phase == pb.DONE, done.message
        assert [b for m, _, _, b in double.requests if m == "PATCH"] == [{"spec": {"replicas": 3}}]
        record, addresses = job.client.get_plan()
        assert record.plan.num_shards == 3 and sorted(addresses) == [0, 1, 2]
        with ShardClient(addresses[2], plan_version=record.plan.version) as c:
            assert c.info().slices, "the shard the StatefulSet added holds its slices of the new plan"
        # fewer shards: roll out first (shard 2's rows move away), then scale in the shard that owns nothing
        done = final(job.client.apply(PLAN1, author="test", reason="back to 2 shards"))
        assert done.phase == pb.DONE, done.message
        wait_until(lambda: double.replicas["embedding-shard"] == 2, what="the scale-in")
        assert [b for m, _, _, b in double.requests if m == "PATCH"] == [{"spec": {"replicas": 3}},
                                                                         {"spec": {"replicas": 2}}]
        record, addresses = job.client.get_plan()
        assert record.plan.num_shards == 2 and sorted(addresses) == [0, 1]
        log = job.coordinator.log_tail(20000)
        assert "scaling StatefulSet recsys/embedding-shard to 3 shards" in log
        assert "shards [2] own nothing" in log
    finally:
        job.close()


def test_a_refused_scale_aborts_the_rollout_and_keeps_the_plan(double, tmp_path):
    from tests.coordinated import PLAN2, Job

    job = Job(tmp_path, *_kube_args(double, tmp_path), standby=0)
    try:
        double.forbid.add("patch")
        done = final(job.client.apply(PLAN2, author="test", reason="3 shards"))
        assert done.phase == pb.ABORTED
        assert "patch statefulsets/embedding-shard/scale" in done.message and "403" in done.message
        assert job.client.get_plan()[0].plan.num_shards == 2
        assert job.coordinator.proc.poll() is None, "the coordinator keeps running"
    finally:
        job.close()


def test_a_restarted_shard_pod_gets_its_slices_once_the_old_trainers_are_gone(double, tmp_path):
    from tests.coordinated import PLAN1, Job

    job = Job(tmp_path, *_kube_args(double, tmp_path), standby=0)
    trainer = FakeTrainer(job.coordinator.address)
    try:
        version = job.client.get_plan()[0].plan.version
        # the pod is killed; the StatefulSet starts it again: `serve --standby --shard-id 1` registers anew
        double.delete_pod(1)
        job.shards.start(1, None)
        double.add_pod(1)
        wait_until(lambda: (m := _shard(job, 1)) is not None and m.plan_version == 0, what="the standby replacement")
        time.sleep(2.0)
        assert _shard(job, 1).plan_version == 0, "no slices while a trainer that used the lost shard is alive"
        trainer.stop()  # the trainer's process exits (its Job restarts it with --resume)
        wait_until(lambda: (m := _shard(job, 1)) is not None and m.plan_version == version, timeout=30,
                   what="the replacement to get its slices")
        with ShardClient(_shard(job, 1).address, plan_version=version) as c:
            info = c.info()
        assert info.plan_version == version
        assert len(info.slices) == sum(1 for ps in PLAN1.slices if ps.shard == 1)
        log = job.coordinator.log_tail(20000)
        assert "shard 1 lost its pod" in log or "shard 1 was replaced" in log
        assert "waiting for trainers [0]" in log and "shard 1 recovered" in log
    finally:
        trainer.stop()
        job.close()


def test_standby_shard_pods_of_a_fresh_cluster_get_the_initial_plan(double, tmp_path):
    """In the cluster every shard pod starts `--standby`; the coordinator's --initial-plan reaches them the
    same way a replaced pod gets its slices back."""
    from protos.plan import dump_plan
    from tests.coordinated import PLAN1, Job

    plan_path = tmp_path / "initial.json"
    plan_path.write_text(dump_plan(PLAN1))
    job = Job(tmp_path, *_kube_args(double, tmp_path), "--initial-plan", str(plan_path), standby=0, initial=False)
    try:
        for shard in (0, 1):
            wait_until(lambda s=shard: (m := _shard(job, s)) is not None and m.plan_version == 1, timeout=30,
                       what=f"shard {shard} to serve the initial plan")
        _, addresses = job.client.get_plan()
        for shard in (0, 1):
            with ShardClient(addresses[shard], plan_version=1) as c:
                assert len(c.info().slices) == sum(1 for ps in PLAN1.slices if ps.shard == shard)
    finally:
        job.close()


def test_a_shard_pod_killed_mid_training_and_the_job_resumes_from_its_checkpoint(double, tmp_path):
    """The whole Kubernetes recovery: shard 1's pod dies while two trainers train; the trainers fail on
    their own (no process of ours stops them); the StatefulSet restarts the pod on standby; the coordinator
    gives it its slices once the old trainers are gone; the trainers' Job restarts them with --resume
    (played here by starting them again); the run ends with the model an uninterrupted run has."""
    from tests.coordinated import Job, assert_equals_reference

    steps = 120
    job = Job(tmp_path, *_kube_args(double, tmp_path), standby=0)
    try:
        trainers = job.train(steps, "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "10")
        job.wait_step(25)
        double.delete_pod(1)
        job.shards.start(1, None)  # kills shard 1 and starts its replacement on standby
        double.add_pod(1)
        wait_until(lambda: trainers.poll() is not None, timeout=120, what="the trainers to fail by themselves")
        assert trainers.poll() != 0, "the trainers cannot finish without shard 1's rows"
        wait_until(lambda: (m := _shard(job, 1)) is not None and m.plan_version == 1, timeout=60,
                   what="the replacement to get its slices")
        trainers.start(resume=True)  # what the Indexed Job does with a failed trainer pod
        job.wait_trainers()
        assert_equals_reference(job, steps)
        assert "shard 1 recovered" in job.coordinator.log_tail(50000)
    finally:
        job.close()


def test_coordinator_starts_and_serves_while_the_api_server_is_down(double, tmp_path):
    from coordinator.process import launch
    from protos.coordinator_client import CoordinatorClient

    args = list(_kube_args(double, tmp_path))
    double.stop()
    proc = launch(args, workdir=tmp_path / "coordinator")
    try:
        with CoordinatorClient(proc.address) as c:
            assert c.members() == []  # serving, not crashed
        wait_until(lambda: "API server unreachable" in proc.log_tail(20000), what="the outage in the log")
        double.start()
        wait_until(lambda: "listed 2 shard pods" in proc.log_tail(20000), timeout=30, what="discovery after the outage")
        log = proc.log_tail(20000)
        assert log.count("API server unreachable") == 1, log  # logged once, however often retried
        assert proc.proc.poll() is None
    finally:
        proc.kill()
