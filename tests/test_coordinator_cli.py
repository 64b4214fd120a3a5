"""The operator CLI against a real coordinator (Redis, shards): propose / show / diff / validate / apply /
status / history / rollback / members, with --json; bad plans and missing tokens refused with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import pytest

from protos import coordinator_pb2
from protos.plan import dump_plan
from tests.coordinated import PLAN1, PLAN2, Job
from tests.test_trainer_equivalence import CONFIG, ROOT

pb = coordinator_pb2


def cli(job: Job | None, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RECSYS_ADMIN_TOKEN", None)
    if token is not None:
        env["RECSYS_ADMIN_TOKEN"] = token
    if job is not None:
        env["RECSYS_COORDINATOR"] = job.coordinator.address
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def job(tmp_path):
    j = Job(tmp_path, standby=1)
    yield j
    j.close()


def test_propose_show_and_refusal(tmp_path):
    out = cli(None, "plan", "propose", "--config", str(CONFIG), "--shards", "3", "--data-parallel-max-kb", "1")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["num_shards"] == 3 and {t["name"] for t in plan["tables"]} == {"users", "items", "cities", "hours"}
    assert plan["data_parallel"] == ["hours"]  # 24 rows x 8 floats: under 1 kB
    (tmp_path / "p.json").write_text(out.stdout)
    shown = cli(None, "plan", "show", str(tmp_path / "p.json"), "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["balance"] >= 1.0 and len(summary["shards"]) == 3
    text = cli(None, "plan", "show", str(tmp_path / "p.json"))
    assert "items" in text.stdout and "balance" in text.stdout.lower()
    too_small = cli(None, "plan", "propose", "--config", str(ROOT / "configs" / "criteo_kaggle.yaml"), "--shards", "2",
                    "--capacity-mb", "1")
    assert too_small.returncode == 2 and "t2" in too_small.stderr and "needs 130 MB" in too_small.stderr


def test_operator_session(job, tmp_path):
    (tmp_path / "p2.json").write_text(dump_plan(PLAN2))
    diff = cli(job, "plan", "diff", str(tmp_path / "p2.json"), "--json")
    assert diff.returncode == 0, diff.stderr
    d = json.loads(diff.stdout)
    assert (d["totals"]["moved_rows"], d["totals"]["local_rows"]) == (397, 367)
    assert cli(job, "plan", "validate", str(tmp_path / "p2.json")).returncode == 0
    # admin RPCs need the bearer token
    no_token = cli(job, "plan", "apply", str(tmp_path / "p2.json"), "--token", "")
    assert no_token.returncode != 0 and "token" in no_token.stderr
    wrong = cli(job, "plan", "apply", str(tmp_path / "p2.json"), token="not-it")
    assert wrong.returncode == 2 and "PERMISSION_DENIED" in wrong.stderr
    applied = cli(job, "plan", "apply", str(tmp_path / "p2.json"), "--reason", "scale out", "--json",
                  token=job.coordinator.token)
    assert applied.returncode == 0, applied.stderr
    lines = [json.loads(line) for line in applied.stdout.splitlines()]
    assert lines[-1]["phase"] == "DONE" and lines[-1]["to_version"] == "2"
    status = json.loads(cli(job, "plan", "status", "--json").stdout)
    assert status["phase"] == "DONE"
    history = json.loads(cli(job, "plan", "history", "--json").stdout)
    assert history["current_version"] == "2" and history["records"][0]["reason"] == "scale out"
    members = json.loads(cli(job, "members", "--json").stdout)
    assert sorted(int(m.get("id", 0)) for m in members if m["kind"] == "SHARD") == [0, 1, 2]
    back = cli(job, "plan", "rollback", token=job.coordinator.token)
    assert back.returncode == 0 and "DONE: version 3 is live" in back.stdout, back.stdout + back.stderr
    assert job.client.get_plan()[0].plan.num_shards == 2


def _variant(**changes) -> dict:
    plan = json.loads(dump_plan(PLAN1))
    for fn in changes.values():
        fn(plan)
    return plan


def test_invalid_plans_are_refused_with_the_reason(job, tmp_path):
    def overlap(p):
        items = next(s for s in p["slices"] if s["slice"]["table"] == "items")
        extra = json.loads(json.dumps(items))
        items["slice"]["num_rows"] = 300
        extra["slice"].update(row_offset=200, num_rows=300)
        p["slices"].append(extra)

    def gap(p):
        next(s for s in p["slices"] if s["slice"]["table"] == "users")["slice"]["num_rows"] = 150

    def unknown(p):
        p["slices"][0]["slice"]["table"] = "nope"

    def dead_owner(p):
        p["num_shards"] = 4
        p["slices"][0]["shard"] = 3

    def over_capacity(p):  # shard 2 registered offering 1 kB
        p["num_shards"] = 3
        for s in p["slices"]:
            s["shard"] = 2

    cases = {"overlap": (overlap, "overlap"), "gap": (gap, "users"), "unknown": (unknown, "nope"),
             "dead": (dead_owner, "shard 3"), "capacity": (over_capacity, "capacity")}
    job.shards.start(2, None)  # replace the standby shard by one that offers 1 kB
    job.shards.procs[2].kill()
    from embedding_service.process import launch
    from protos.plan import shard_config

    small = launch(shard_config(None, 2, coordinator=job.coordinator.address, num_trainers=2, capacity_bytes=1024),
                   workdir=tmp_path / "small")
    try:
        for name, (change, needle) in cases.items():
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(_variant(x=change)))
            v = cli(job, "plan", "validate", str(path), "--json")
            assert v.returncode == 1, (name, v.stdout, v.stderr)
            violations = json.loads(v.stdout)["violations"]
            assert any(needle in x for x in violations), (name, violations)
            a = cli(job, "plan", "apply", str(path), token=job.coordinator.token)
            assert a.returncode == 2 and "INVALID_ARGUMENT" in a.stderr and needle in a.stderr, (name, a.stderr)
        assert job.client.history().current_version == 1  # nothing changed
    finally:
        small.kill()


def test_bad_requests_get_precise_statuses_and_change_nothing(job):
    from protos import coordinator_pb2_grpc

    stub = coordinator_pb2_grpc.CoordinatorStub(job.client.channel)
    cases = [
        (stub.Register, pb.RegisterRequest(member=pb.Member(kind=pb.SHARD, id=7, instance="x")),
         grpc.StatusCode.INVALID_ARGUMENT, "member.address"),
        (stub.Register, pb.RegisterRequest(member=pb.Member(kind=0, id=1, instance="x")),
         grpc.StatusCode.INVALID_ARGUMENT, "member.kind"),
        (stub.Register, pb.RegisterRequest(member=pb.Member(kind=pb.TRAINER, id=-1, instance="x")),
         grpc.StatusCode.INVALID_ARGUMENT, "member.id"),
        (stub.GetPlan, pb.GetPlanRequest(version=42), grpc.StatusCode.NOT_FOUND, "42"),
        (stub.ReportFenced, pb.ReportFencedRequest(trainer_id=0, rollout_id="nope", step=3),
         grpc.StatusCode.FAILED_PRECONDITION, "rollout_id"),
    ]
    for call, request, code, needle in cases:
        with pytest.raises(grpc.RpcError) as e:
            call(request, timeout=10)
        assert e.value.code() == code and needle in e.value.details(), (request, e.value.details())
    with pytest.raises(grpc.RpcError) as e:  # a plan without tables, with the token
        list(job.client.apply(pb.PlanRecord().plan))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "plan" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # rollback with nothing to roll back to
        list(job.client.rollback())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "previous version" in e.value.details()
    assert job.client.history().current_version == 1
    assert sorted(m.id for m in job.client.members() if m.kind == pb.SHARD) == [0, 1, 2]


def test_a_trainer_that_does_not_fence_aborts_the_rollout(tmp_path):
    """A registered trainer that never stops: the rollout aborts after --fence-timeout-s, the plan stays,
    and the trainer, stopping late, is resumed on the old plan at once instead of hanging."""
    from protos.coordinator_client import final
    from trainer.coordination import PlanFollower

    job = Job(tmp_path, "--fence-timeout-s", "2", standby=1)
    follower = PlanFollower(job.coordinator.address, rank=0).start()
    try:
        plan, addresses = follower.current_plan()
        assert plan.version == 1 and len(addresses) == 2
        p = final(job.client.apply(PLAN2, base_version=1, author="test"))
        assert p.phase == pb.ABORTED and "trainers [0] did not fence within 2 s" in p.message
        assert job.client.history().current_version == 1
        assert not follower.fence_pending  # FENCE and RESUME both came: nothing left to do
        second = job.client.apply(PLAN2, base_version=1, author="test")  # a second try: leave it fencing
        deadline = time.monotonic() + 10
        while not follower.fence_pending:
            assert time.monotonic() < deadline, "no FENCE reached the trainer"
            time.sleep(0.05)
        time.sleep(2.5)  # ... until it times out
        resumed = follower.fence(step=5, timeout_s=30)
        assert resumed.kind == pb.RESUME and resumed.plan_version == 1
        assert final(second).phase == pb.ABORTED
    finally:
        follower.close()
        job.close()
