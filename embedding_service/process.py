"""Starts a shard server as a child process and waits for its announced port (tests, demo, benchmarks)."""

from __future__ import annotations

from pathlib import Path

from protos.process import ServerProcess, launch_with_config, workdir_for


def launch(config: dict, *, workdir: str | Path | None = None, extra_args: list[str] | None = None,
           timeout: float = 180.0, env: dict[str, str] | None = None) -> ServerProcess:
    """`embedding-shard serve --config` of `config` (a shard config dict, e.g. `protos.plan.shard_config`).

    A config without `checkpoint_root` gets the launcher's work area, the parent of `workdir`: local jobs,
    tests and the demo keep each shard's workdir and the job's checkpoints side by side there."""
    if "checkpoint_root" not in config:
        wd = workdir_for(workdir, "shard-")
        config, workdir = {**config, "checkpoint_root": str(wd.parent)}, wd
    return launch_with_config("embedding_service.cli", config, what="shard", workdir=workdir, extra_args=extra_args,
                              timeout=timeout, env=env)
