"""Fixtures that start real shard server processes on loopback and always stop them, and a
self-signed certificate for 127.0.0.1 / localhost (its own CA) for the TLS tests."""

from __future__ import annotations

import pytest

from embedding_service.process import launch
from protos.process import ServerProcess
from protos.security import write_self_signed
from protos.shard_client import ShardClient


@pytest.fixture
def shard_factory(tmp_path):
    started: list[tuple[ServerProcess, ShardClient]] = []

    def start(config: dict, name: str = "shard", **kwargs) -> tuple[ServerProcess, ShardClient]:
        proc = launch(config, workdir=tmp_path / f"{name}-{len(started)}", **kwargs)
        client = ShardClient(proc.address, plan_version=config.get("plan_version", 0))
        started.append((proc, client))
        return proc, client

    yield start
    for proc, client in started:
        client.close()
        proc.kill()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("certs")
    cert, key = write_self_signed(d, "server")
    other_ca, other_key = write_self_signed(d, "other")
    # mutual TLS: "cert"/"key" also serve as the client certificate of the "ca" (it signs itself);
    # "other_ca"/"other_key" are a client certificate from another CA
    return {"cert": cert, "key": key, "ca": cert, "other_ca": other_ca, "other_key": other_key}


@pytest.fixture
def job_factory(tmp_path):
    """Coordinated jobs (tests/coordinated.py: a coordinator, its shards, two trainers), each closed at the end."""
    from tests.coordinated import Job

    jobs: list[Job] = []

    def make(*args: str, **kwargs) -> Job:
        jobs.append(Job(tmp_path, *args, **kwargs))
        return jobs[-1]

    yield make
    for j in jobs:
        j.close()
