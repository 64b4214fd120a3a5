"""Starts a shard server as a child process and waits for its announced port (tests, demo, benchmarks)."""

from __future__ import annotations

from pathlib import Path

from protos.process import ServerProcess, launch_with_config


def launch(config: dict, *, workdir: str | Path | None = None, extra_args: list[str] | None = None,
           timeout: float = 180.0, env: dict[str, str] | None = None) -> ServerProcess:
    """`embedding-shard serve --config` of `config` (a shard config dict, e.g. `protos.plan.shard_config`)."""
    return launch_with_config("embedding_service.cli", config, what="shard", workdir=workdir, extra_args=extra_args,
                              timeout=timeout, env=env)
