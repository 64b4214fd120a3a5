"""Shard configuration: which slices this shard holds, how it trains them, and how it serves."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embedding_service.publisher import PublishSettings
from protos import common_pb2
from protos.cli_errors import file_error
from protos.plan import assignment_from_dict, validate_assignment
from protos.security import TlsConfig

# fbgemm-gpu's CPU build implements only these fused optimizers; the rest exist on CUDA alone.
CPU_OPTIMIZERS = frozenset(
    {common_pb2.EXACT_SGD, common_pb2.EXACT_ADAGRAD, common_pb2.EXACT_ROWWISE_ADAGRAD}
)


class SyncMode(enum.Enum):
    """SYNC merges every trainer's update of a step into one; ASYNC applies each as it arrives."""

    SYNC = "sync"
    ASYNC = "async"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port and report it
    metrics_port: int | None = 0  # None: no Prometheus endpoint
    max_message_bytes: int = 256 * 1024 * 1024
    workers: int = 0  # 0: enough for every trainer's pipelined lookup and update on top of a base of 16
    # RPCs gRPC admits at once, running or queued for a worker; past it gRPC itself answers RESOURCE_EXHAUSTED
    # (0: 4 x workers). Bounds the memory of a flood that the workers cannot keep up with.
    max_concurrent_rpcs: int = 0
    tls_cert: str | None = None  # PEM paths; both set: serve TLS only
    tls_key: str | None = None
    # PEM of the CA that signs client certificates: mutual TLS, every RPC (data plane too) needs one
    tls_client_ca: str | None = None

    def __post_init__(self) -> None:
        TlsConfig.from_paths(self.tls_cert, self.tls_key, self.tls_client_ca)  # both or neither


@dataclass
class ShardConfig:
    assignment: common_pb2.ShardAssignment
    device: str = "cpu"
    mode: SyncMode = SyncMode.SYNC
    num_trainers: int = 1
    # ASYNC only: a trainer's lookup of step s waits for its update of step s-1-staleness.
    staleness: int = 0
    handle_ttl_s: float = 120.0
    wait_timeout_s: float = 60.0
    # Bounds under load (many async trainers): lookup handles awaiting their update (each holds a forward's
    # indices and outputs), and Lookup requests inside the shard at once (running or waiting for their step;
    # Updates are never refused for load: they are what drains the handles). Past either bound:
    # RESOURCE_EXHAUSTED naming it, and nothing changes.
    max_pending_handles: int = 1024
    max_inflight_lookups: int = 256
    clamp_ids: bool = False
    seed: int = 0
    export_chunk_bytes: int = 4 * 1024 * 1024
    # Intra-op threads for the TBE kernels; None: all cores but one, which is left to gRPC's I/O
    # (on 2 cores a single kernel thread gives the fastest steps: gRPC then never waits for a core).
    compute_threads: int | None = None
    # Collective transport: this shard's rank in the job's torch.distributed group (trainers are ranks
    # 0..num_trainers-1) and the group's size; MASTER_ADDR/MASTER_PORT come from the environment.
    collective_rank: int | None = None
    collective_world_size: int | None = None
    # No collective waits longer for a peer (a frozen trainer or shard): it raises instead (None: 300 s).
    collective_timeout_s: float | None = None
    # Membership: register with the coordinator at this address and heartbeat; others reach this shard at
    # `advertise` (default: the bound host:port); `capacity_bytes` is offered to the planner (0: unknown).
    coordinator: str | None = None
    advertise: str | None = None
    capacity_bytes: int = 0
    # CA (PEM) of the TLS servers this shard calls: the coordinator and the shards it pulls rows from
    tls_ca: str | None = None
    # Checkpoint and Restore read and write only under this directory (created at start); a request's
    # `directory` is a name relative to it or an absolute path inside it (protos.paths.confine)
    checkpoint_root: str = "checkpoints"
    # the control-plane bearer token (Checkpoint, Restore, ExportRows, ImportRows, Prepare, PullRows,
    # Commit, Abort) is read from this file, else from env RECSYS_CONTROL_TOKEN; none: the control plane
    # is open (loopback) unless mutual TLS is on. The shard presents the same token to its peers.
    token_file: str | None = None
    # Online freshness: publish the rows each step changed to Redis Streams (embedding_service.publisher)
    publish_deltas: PublishSettings | None = None
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        validate_assignment(self.assignment)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {self.device!r}")
        if self.num_trainers < 1:
            raise ValueError(f"num_trainers: must be >= 1, got {self.num_trainers}")
        if self.collective_rank is not None:
            world = self.collective_world_size or 0
            if not self.num_trainers <= self.collective_rank < world:
                raise ValueError(f"collective_rank: {self.collective_rank} must be in [num_trainers "
                                 f"{self.num_trainers}, collective_world_size {world})")
        for name in ("max_pending_handles", "max_inflight_lookups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.staleness < 0:
            raise ValueError(f"staleness: must be >= 0, got {self.staleness}")
        if self.device == "cpu":
            for t in self.assignment.tables:
                if t.optimizer.type not in CPU_OPTIMIZERS and t.optimizer.type != 0:
                    name = common_pb2.OptimizerType.Name(t.optimizer.type)
                    raise ValueError(
                        f"table {t.name!r}: optimizer {name} is not supported in CPU mode by fbgemm "
                        "(CUDA only); use EXACT_SGD, EXACT_ADAGRAD or EXACT_ROWWISE_ADAGRAD, or device: cuda"
                    )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ShardConfig:
        raw = dict(raw)
        assignment = assignment_from_dict(raw)
        server = ServerConfig(**raw.pop("server", {}) or {})
        for key in ("shard_id", "plan_version", "tables", "slices"):
            raw.pop(key, None)
        if "mode" in raw:
            raw["mode"] = SyncMode(str(raw["mode"]).lower())
        if isinstance(raw.get("publish_deltas"), dict):
            fields = set(PublishSettings.__dataclass_fields__)
            unknown = set(raw["publish_deltas"]) - fields
            if unknown:
                raise ValueError(f"publish_deltas: unknown keys {sorted(unknown)} (known: {sorted(fields)})")
            raw["publish_deltas"] = PublishSettings(**raw["publish_deltas"])
        known = {f for f in cls.__dataclass_fields__ if f not in ("assignment", "server")}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown shard config keys: {sorted(unknown)}")
        return cls(assignment=assignment, server=server, **raw)

    @classmethod
    def load(cls, path: str | Path) -> ShardConfig:
        text = Path(path).read_text()
        try:
            raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
            if not isinstance(raw, dict):
                raise ValueError("expected a mapping at the top level")
            return cls.from_dict(raw)
        except (ValueError, yaml.YAMLError) as e:
            raise file_error(path, e) from None
