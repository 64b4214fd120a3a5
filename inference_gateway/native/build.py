"""Compiles serve-native's frontend (frontend.cc, on Debian's grpc++, nghttp2 and OpenSSL) once per source version,
into the environment's own directory; `make install` runs it so the first start does not. The benchmarks' native
probe (benchmarks/probe.cc) is compiled the same way, on first use.

    python -m inference_gateway.native.build [--jemalloc]   # prints the binary's path

The compiler, grpc++, nghttp2 and OpenSSL are Debian packages, not PyPI's: when they are missing and this runs as
root with apt-get, it installs them (as the benchmarks install h2load); otherwise it fails naming them. With
--jemalloc (make install) it also installs jemalloc (libjemalloc2) that way when missing, which the gateways
preload (--allocator auto).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from inference_gateway.allocator import Allocator, preload

SOURCE = Path(__file__).resolve().parent / "frontend.cc"
DEBIAN = ["g++", "libgrpc++-dev", "libnghttp2-dev", "libssl-dev", "pkg-config"]  # the engines: grpc++; nghttp2, OpenSSL
RUNTIME_DEBIAN = ["libjemalloc2"]  # the gateways' --allocator auto preloads it (inference_gateway.allocator)
BUILD_DIR = Path(sys.prefix) / "libexec" / "inference-gateway"


class BuildError(RuntimeError):
    """A grpc++ program (the frontend, the benchmarks' probe) cannot be built here (what is missing, and how to
    install it)."""


def _flags(library: str) -> list[str] | None:
    """g++'s flags for `library` (pkg-config's name), or None when g++, pkg-config or its headers are missing."""
    if not (shutil.which("pkg-config") and shutil.which("g++")):
        return None
    r = subprocess.run(["pkg-config", "--cflags", "--libs", *library.split()], capture_output=True, text=True,
                       check=False)
    return r.stdout.split() if r.returncode == 0 else None


def install_debian(packages: list[str]) -> str:
    """apt-get install `packages` (after an `apt-get update` if the first try fails); the tail of its output."""
    out = ""
    for update in (False, True):
        if update:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
        r = subprocess.run(["apt-get", "install", "-y", "-q", *packages], capture_output=True, text=True, check=False,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        out = (r.stdout + r.stderr)[-2000:]
        if r.returncode == 0:
            break
    return out


def binary_path(build_dir: Path = BUILD_DIR, source: Path = SOURCE) -> Path:
    return Path(build_dir) / f"{source.stem}-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}"


def build(build_dir: Path = BUILD_DIR, source: Path = SOURCE, library: str = "grpc++ libnghttp2 openssl") -> Path:
    """The binary of `source` (the frontend's, on grpc++, nghttp2 and OpenSSL, or another program on `library`,
    pkg-config names, such as the benchmarks' probe.cc on grpc++: DEBIAN provides them), compiled if it is not
    there for this version of the source yet (written atomically)."""
    out = binary_path(build_dir, source)
    if out.exists():
        return out
    what = "serve-native" if source == SOURCE else source.name
    flags, apt = _flags(library), ""
    if flags is None and os.geteuid() == 0 and shutil.which("apt-get"):
        apt = install_debian(DEBIAN)
        flags = _flags(library)
    if flags is None:
        raise BuildError(f"{what}: g++ and {library} are missing (Debian: apt-get install {' '.join(DEBIAN)})"
                         + (f"; apt-get said: {apt}" if apt else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    r = subprocess.run(["g++", "-O2", "-std=c++17", "-Wall", str(source), "-o", str(tmp), *flags, "-lpthread"],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{what}: compiling {source.name} failed: {r.stderr[-3000:]}")
    os.replace(tmp, out)
    return out


def ensure_jemalloc() -> tuple[str | None, str]:
    """jemalloc for --allocator auto, installed as root with apt-get when missing (`make install` asks for it
    with --jemalloc; the image's runtime stage installs it itself): the library or None (then the gateways
    run on glibc's malloc), and what apt-get said."""
    found, apt = preload(Allocator.AUTO), ""
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        apt = install_debian(RUNTIME_DEBIAN)
        found = preload(Allocator.AUTO)
    return found, apt


if __name__ == "__main__":
    if "--jemalloc" in sys.argv[1:]:
        lib, apt = ensure_jemalloc()
        if lib is None:
            print(f"jemalloc missing (apt-get install {' '.join(RUNTIME_DEBIAN)}): the gateways run on glibc's "
                  "malloc" + (f"; apt-get said: {apt}" if apt else ""), file=sys.stderr)
    try:
        print(build())
    except BuildError as e:
        raise SystemExit(str(e)) from None
