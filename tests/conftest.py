"""Fixtures that start real shard server processes on loopback and always stop them."""

from __future__ import annotations

import pytest

from embedding_service.client import ShardClient
from embedding_service.process import ShardProcess, launch


@pytest.fixture
def shard_factory(tmp_path):
    started: list[tuple[ShardProcess, ShardClient]] = []

    def start(config: dict, name: str = "shard", **kwargs) -> tuple[ShardProcess, ShardClient]:
        proc = launch(config, workdir=tmp_path / f"{name}-{len(started)}", **kwargs)
        client = ShardClient(proc.address, plan_version=config.get("plan_version", 0))
        started.append((proc, client))
        return proc, client

    yield start
    for proc, client in started:
        client.close()
        proc.kill()
