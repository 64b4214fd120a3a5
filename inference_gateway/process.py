"""Starts a gateway as a child process and waits for its announced port (tests, demo, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protos.process import ServerProcess, start_announced, workdir_for


@dataclass
class GatewayProcess(ServerProcess):
    def log_text(self) -> str:
        return self.log_tail(chars=1 << 30)


def launch(args: list[str], *, workdir: str | Path | None = None, timeout: float = 120.0,
           env: dict[str, str] | None = None) -> GatewayProcess:
    """`inference-gateway serve ARGS` (port 0 unless given) as a child; returns once it announced."""
    wd = workdir_for(workdir, "gateway-")
    proc, msg = start_announced(["inference_gateway.cli", "serve", *args], wd, what="gateway", timeout=timeout,
                                env=env)
    return GatewayProcess(proc, msg, wd)


def launch_triton(args: list[str], *, workdir: str | Path | None = None, timeout: float = 300.0,
                  env: dict[str, str] | None = None) -> GatewayProcess:
    """`inference-gateway serve-triton ARGS` as a child (its repository and logs under workdir); returns
    once it announced its ports (OIP `port`, `predict_port`, `management_port`) and tritonserver's pid."""
    wd = workdir_for(workdir, "triton-gateway-")
    proc, msg = start_announced(["inference_gateway.cli", "serve-triton", "--workdir", str(wd / "triton"), *args], wd,
                                what="triton gateway", timeout=timeout, env=env)
    return GatewayProcess(proc, msg, wd)


def launch_native(args: list[str], *, workdir: str | Path | None = None, timeout: float = 300.0,
                  env: dict[str, str] | None = None) -> GatewayProcess:
    """`inference-gateway serve-native ARGS` as a child (table image and logs under workdir); returns once
    every worker is connected (announced: `port`, `metrics_port`, `frontend_pid`, `worker_pids`)."""
    wd = workdir_for(workdir, "native-gateway-")
    proc, msg = start_announced(["inference_gateway.cli", "serve-native", "--workdir", str(wd / "native"), *args], wd,
                                what="native gateway", timeout=timeout, env=env)
    return GatewayProcess(proc, msg, wd)
