"""Where a rollout's shards come from. A plan may need more (or fewer) shards than run now: on Kubernetes
the coordinator scales the shard StatefulSet; as local processes (the embedded default) the shards are
whatever the operator or `coordinator job` started, so nothing scales and the rollout engine behaves
exactly as before. The engine only talks to this protocol, so it never imports the Kubernetes client.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class ScalingError(RuntimeError):
    """The shard set could not be resized; the message says what was refused and why (it aborts a rollout)."""


@runtime_checkable
class ShardScaler(Protocol):
    """Resizes the set of shard processes; shard ids are 0..replicas-1 (a StatefulSet's ordinals)."""

    @property
    def elastic(self) -> bool:
        """True when `scale_to` really creates and removes shards (the rollout then waits for them)."""
        ...

    def describe(self) -> str:
        """What is scaled, for log lines and rollout messages (e.g. 'StatefulSet ns/embedding-shard')."""
        ...

    def replicas(self) -> int | None:
        """How many shards are asked for now; None when this scaler does not know (fixed shards)."""
        ...

    def scale_to(self, replicas: int) -> None:
        """Asks for exactly `replicas` shards; raises ScalingError when refused or unreachable."""
        ...


class FixedShards:
    """The local default: shards are started by someone else, and a plan must fit those that registered."""

    elastic = False

    def describe(self) -> str:
        return "fixed shards"

    def replicas(self) -> int | None:
        return None

    def scale_to(self, replicas: int) -> None:
        raise ScalingError(f"cannot scale to {replicas} shards: this coordinator does not manage its shards "
                           "(start it with --kubernetes, or start the shards yourself)")
