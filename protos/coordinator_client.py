"""Python client of the coordinator (trainers, the operator CLI, tests)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from protos import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from protos.channels import ChannelClient, open_channel
from protos.security import bearer_metadata

pb = coordinator_pb2


class CoordinatorClient(ChannelClient):
    def __init__(self, address: str, *, token: str | None = None, tls_ca: str | None = None,
                 timeout: float = 30.0, tls_cert: str | None = None, tls_key: str | None = None) -> None:
        self.address, self.timeout = address, timeout
        self.channel = open_channel(address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self._auth = bearer_metadata(token) if token else ()

    def get_plan(self, version: int = 0) -> tuple[pb.PlanRecord, dict[int, str]]:
        resp = self.stub.GetPlan(pb.GetPlanRequest(version=version), timeout=self.timeout)
        return resp.record, dict(resp.shard_addresses)

    def shard_addresses(self, plan: common_pb2.ShardingPlan, wait_s: float = 0.0) -> list[str]:
        """The live address of every shard a plan names, in shard order; waits up to `wait_s` for all."""
        alive = self.wait_shards(list(range(plan.num_shards)), wait_s)
        return [alive[i].address for i in range(plan.num_shards)]

    def wait_shards(self, ids: list[int], wait_s: float) -> dict[int, pb.Member]:
        """Waits until every shard in `ids` is registered and alive; returns their members."""
        deadline = time.monotonic() + wait_s
        while True:
            alive = {m.id: m for m in self.members() if m.kind == pb.SHARD and m.state == pb.ALIVE}
            missing = [i for i in ids if i not in alive]
            if not missing:
                return alive
            if time.monotonic() >= deadline:
                raise RuntimeError(f"coordinator {self.address}: shards {missing} did not register within {wait_s} s")
            time.sleep(0.2)

    def watch_plan(self, trainer_id: int = 0) -> Iterator[pb.PlanEvent]:
        return self.stub.WatchPlan(pb.WatchPlanRequest(trainer_id=trainer_id))

    def report_fenced(self, trainer_id: int, rollout_id: str, step: int) -> None:
        self.stub.ReportFenced(pb.ReportFencedRequest(trainer_id=trainer_id, rollout_id=rollout_id, step=step),
                               timeout=self.timeout)

    def members(self) -> list[pb.Member]:
        return list(self.stub.ListMembers(pb.ListMembersRequest(), timeout=self.timeout).members)

    def history(self, limit: int = 0) -> pb.PlanHistoryResponse:
        return self.stub.PlanHistory(pb.PlanHistoryRequest(limit=limit), timeout=self.timeout)

    def validate(self, plan: common_pb2.ShardingPlan) -> list[str]:
        return list(self.stub.ValidatePlan(pb.ValidatePlanRequest(plan=plan), timeout=self.timeout).violations)

    def status(self) -> pb.RolloutProgress:
        return self.stub.RolloutStatus(pb.RolloutStatusRequest(), timeout=self.timeout)

    def apply(self, plan: common_pb2.ShardingPlan, *, base_version: int = 0, author: str = "",
              reason: str = "") -> Iterator[pb.RolloutProgress]:
        """Progress until DONE or ABORTED; a refused plan or a conflict raises grpc.RpcError at the first item."""
        return self.stub.ApplyPlan(pb.ApplyPlanRequest(plan=plan, base_version=base_version, author=author,
                                                       reason=reason), metadata=self._auth)

    def rollback(self, *, author: str = "", reason: str = "") -> Iterator[pb.RolloutProgress]:
        return self.stub.Rollback(pb.RollbackRequest(author=author, reason=reason), metadata=self._auth)


def final(progress: Iterator[pb.RolloutProgress]) -> pb.RolloutProgress:
    """Drains a progress stream; returns its last message."""
    last = None
    for p in progress:
        last = p
    if last is None:
        raise grpc.RpcError("the rollout stream ended without a message")
    return last
