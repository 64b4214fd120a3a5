"""A prototype native frontend (frontend.cc: grpc++ and a dynamic batcher) over Python batch workers
(worker.py), started by serve.py; measured by benchmarks.native_floor and `benchmarks.gateway_load
--frontend native`. Not part of the product."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from inference_gateway.process import GatewayProcess
from protos.process import start_announced, workdir_for

SOURCE = Path(__file__).resolve().parent / "frontend.cc"
DEBIAN = ["g++", "libgrpc++-dev", "pkg-config"]
BUILD_CACHE = Path(tempfile.gettempdir()) / "native-frontend"


def build(cache: Path = BUILD_CACHE) -> Path:
    """frontend.cc compiled once per source version; installs the Debian packages when missing (root)."""
    out = Path(cache) / f"frontend-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]}"
    if out.exists():
        return out

    def flags() -> list[str] | None:
        r = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True,
                           check=False) if shutil.which("pkg-config") else None
        return r.stdout.split() if r is not None and r.returncode == 0 and shutil.which("g++") else None

    if flags() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", *DEBIAN], capture_output=True, check=False)
    found = flags()
    if found is None:
        raise SystemExit(f"native frontend: g++ and grpc++ are missing (Debian: apt-get install {' '.join(DEBIAN)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run(["g++", "-O2", "-std=c++17", "-Wall", str(SOURCE), "-o", str(tmp), *found, "-lpthread"],
                   check=True)
    os.replace(tmp, out)
    return out


def launch(package: str | Path, *, workers: int = 2, frontend_args: str = "", workdir: str | Path | None = None,
           timeout: float = 300.0) -> GatewayProcess:
    """serve.py as a child (frontend and workers its children); returns once it announced its port."""
    wd = workdir_for(workdir, "native-gateway-")
    proc, msg = start_announced(["benchmarks.native_frontend.serve", "--package", str(package), "--workers",
                                 str(workers), "--workdir", str(wd), f"--frontend-args={frontend_args}"], wd,
                                what="native gateway", timeout=timeout)
    return GatewayProcess(proc, msg, wd)
