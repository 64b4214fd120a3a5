"""Shared pieces of the coordinator tests: a coordinator process, shards and trainers registered with it,
and the comparison of a finished job against one process training on the global batch."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from coordinator.launcher import LocalShards, LocalTrainers
from coordinator.process import CoordinatorProcess, launch
from protos import codec, common_pb2, coordinator_pb2
from protos.coordinator_client import CoordinatorClient
from protos.plan import assignment, dump_plan, simple_plan
from protos.shard_client import ShardClient
from tests.test_trainer_equivalence import CONFIG, MODEL, SEED, reference

pb = coordinator_pb2
BATCH = 32
# v1: every table whole on 2 shards; v2: 3 shards, the largest table (items) row-wise over all three
PLAN1 = simple_plan(MODEL, 2)
PLAN2 = simple_plan(MODEL, 3, kinds={"items": common_pb2.ROW_WISE})


class Job:
    """A coordinator (initial plan PLAN1), its shards, and two trainers; everything stopped by close()."""

    def __init__(self, tmp_path: Path, *coordinator_args: str, standby: int = 1, initial: bool = True,
                 shard_overrides: dict[int, dict] | None = None, coordinator_env: dict[str, str] | None = None) -> None:
        """`shard_overrides`: per shard id, config keys for that shard only (its port, its advertised address);
        `coordinator_env`: extra environment of the coordinator process (failpoints)."""
        self.tmp = tmp_path
        plan_path = tmp_path / "plan1.json"
        plan_path.write_text(dump_plan(PLAN1))
        args = ["--lease-s", "4", *(["--initial-plan", str(plan_path)] if initial else []), *coordinator_args]
        self.coordinator: CoordinatorProcess = launch(args, workdir=tmp_path / "coordinator", env=coordinator_env)
        self.client = CoordinatorClient(self.coordinator.address, token=self.coordinator.token)
        self.shards = LocalShards(self.coordinator.address, tmp_path, num_trainers=2, seed=SEED)
        self.trainers: LocalTrainers | None = None
        for i in range(PLAN1.num_shards):
            self.shards.start(i, PLAN1 if initial else None, **(shard_overrides or {}).get(i, {}))
        for i in range(PLAN1.num_shards, PLAN1.num_shards + standby):
            self.shards.start(i, None)
        self.client.wait_shards(list(range(PLAN1.num_shards + standby)), wait_s=60)

    def train(self, steps: int, *extra: str, start: bool = True) -> LocalTrainers:
        self.trainers = LocalTrainers(self.coordinator.address, CONFIG, 2,
                                      ["--steps", str(steps), "--batch-size", str(BATCH), "--seed", str(SEED),
                                       "--out", str(self.tmp / "out"), "--json", *extra], self.tmp)
        if start:
            self.trainers.start(resume=False)
        return self.trainers

    def wait_step(self, step: int, timeout: float = 120.0) -> int:
        """Waits until both trainers report a step >= `step` (heartbeats carry it)."""
        deadline = time.monotonic() + timeout
        while True:
            steps = [m.step for m in self.client.members() if m.kind == pb.TRAINER and m.state == pb.ALIVE]
            if len(steps) == 2 and min(steps) >= step:
                return min(steps)
            if time.monotonic() > deadline:
                tail = self.trainers.stderr_tail() if self.trainers is not None else ""
                raise AssertionError(f"trainers did not reach step {step}: {steps}\n{tail}")
            time.sleep(0.02)

    def wait_trainers(self, timeout: float = 300.0) -> None:
        assert self.trainers is not None
        deadline = time.monotonic() + timeout
        while self.trainers.poll() is None:
            assert time.monotonic() < deadline, "trainers did not finish"
            time.sleep(0.1)
        assert self.trainers.poll() == 0, self.trainers.stderr_tail()

    def close(self) -> None:
        if self.trainers is not None:
            self.trainers.stop()
        self.shards.stop_all()
        self.client.close()
        self.coordinator.kill()


def gather_tables(plan: common_pb2.ShardingPlan, addresses: list[str]) -> dict[str, tuple[torch.Tensor, list]]:
    """Every table (weights and optimizer state) reassembled from the shards of a plan."""
    out: dict[str, tuple[torch.Tensor, list]] = {}
    for t in plan.tables:
        out[t.name] = (torch.full((t.num_rows, t.dim), float("nan")), [])
    for shard, address in enumerate(addresses):
        with ShardClient(address, plan_version=plan.version) as c:
            for idx, sl in enumerate(assignment(plan, shard).slices):
                w, states = [], []
                for chunk in c.export_rows(idx, 0, sl.num_rows):
                    w.append(codec.decode(chunk.weights).clone())
                    states.append([codec.decode(x).clone() for x in chunk.optimizer_state])
                weights, st = out[sl.table]
                weights[sl.row_offset : sl.row_offset + sl.num_rows, sl.col_offset : sl.col_offset + sl.num_cols] = \
                    torch.cat(w)
                if states and states[0]:
                    st.append((sl, [torch.cat([s[k] for s in states]) for k in range(len(states[0]))]))
    return out


@functools.lru_cache(maxsize=4)
def cached_reference(steps: int):
    """The reference run of `steps` steps, computed once per test process: it costs about as much CPU as the
    job it checks, and several tests compare against the same one (it is only read)."""
    return reference(MODEL, steps=steps, batch_size=BATCH)


def assert_equals_reference(job: Job, steps: int) -> None:
    """Dense state, every table's weights and optimizer state == one process on the global batch (1e-5)."""
    ref_tables, ref_model = cached_reference(steps)
    dense = torch.load(job.tmp / "out" / "dense.pt")
    for name, value in ref_model.state_dict().items():
        torch.testing.assert_close(dense[name], value, atol=1e-5, rtol=0, msg=name)
    record, _ = job.client.get_plan()
    plan = record.plan
    got = gather_tables(plan, job.client.shard_addresses(plan))
    for ref in ref_tables.slices:
        weights, states = got[ref.slice.table]
        torch.testing.assert_close(weights, ref.weights.detach(), atol=1e-5, rtol=0, msg=f"{ref.slice.table} weights")
        for sl, tensors in states:
            rows = slice(sl.row_offset, sl.row_offset + sl.num_rows)
            cols = slice(sl.col_offset, sl.col_offset + sl.num_cols)
            for k, live in enumerate(ref.states):
                want = live.detach()[rows] if live.dim() == 1 else live.detach()[rows, cols]
                torch.testing.assert_close(tensors[k].view(want.shape), want, atol=1e-5, rtol=0,
                                           msg=f"{sl.table} optimizer state")
