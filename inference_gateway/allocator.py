"""malloc for the gateways' serving processes (serve-triton's tritonserver and workers, serve-native's
frontend and workers): jemalloc through LD_PRELOAD, or glibc's.

glibc's malloc costs a busy gRPC server ~10% of its CPU per request (malloc/free across its threads:
perf of tritonserver and of serve-native's frontend); PyTorch's CPU performance guide and Triton's docs
both recommend jemalloc or tcmalloc through LD_PRELOAD. tcmalloc_minimal 2.10 measured no better than
glibc here. serve-native on jemalloc: 10% less CPU per W1 request and 10% more requests/s at 512 streams,
no change at 64 (medians of 6 alternating rounds: `python -m benchmarks.native_allocator --rounds 6`).
"""

from __future__ import annotations

import ctypes.util
import enum
import os
import re

MALLOCS = ("libjemalloc", "libtcmalloc", "libmimalloc", "libtbbmalloc")  # preloads that replace malloc: one a process


class Allocator(enum.Enum):
    AUTO = "auto"  # jemalloc when the system has it (Debian: libjemalloc2), else glibc
    JEMALLOC = "jemalloc"  # jemalloc or refuse to start
    GLIBC = "glibc"


class AllocatorMissing(RuntimeError):
    """--allocator jemalloc on a system without it (the message says what to install)."""


def preload(allocator: Allocator) -> str | None:
    """The library to LD_PRELOAD for `allocator` (None: glibc's malloc); AllocatorMissing when it must be
    jemalloc and there is none."""
    if allocator is Allocator.GLIBC:
        return None
    found = ctypes.util.find_library("jemalloc")  # its soname: the dynamic loader searches as for DT_NEEDED
    if found is None and allocator is Allocator.JEMALLOC:
        raise AllocatorMissing("allocator: jemalloc not found (Debian/Ubuntu: apt-get install libjemalloc2)")
    return found


def with_preload(env: dict[str, str], lib: str | None) -> dict[str, str]:
    """`env` whose LD_PRELOAD names `lib` first (None: glibc's malloc) and no other malloc replacement (MALLOCS):
    one inherited from the parent (a supervisor started under jemalloc) is dropped, so `--allocator glibc`
    means glibc; other preloads are kept. Children inherit it."""
    kept = [p for p in re.split(r"[:\s]+", env.get("LD_PRELOAD", ""))
            if p and not os.path.basename(p).startswith(MALLOCS)]
    preloads = [lib, *kept] if lib else kept
    if preloads:
        env["LD_PRELOAD"] = " ".join(preloads)
    else:
        env.pop("LD_PRELOAD", None)
    return env
