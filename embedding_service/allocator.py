"""glibc malloc settings for processes that move multi-MB tensors every step.

Every lookup allocates pooled outputs, request and response buffers of several MB. With glibc's
defaults these come from fresh mmaps whose pages fault in (zeroed) on first touch: on this machine
kind that costs more than the TBE kernel itself (forward+backward at pooling factor 1: 18 ms with
the defaults, 10 ms tuned). A fixed 32 MiB mmap threshold and a high trim threshold keep such buffers
on the heap for reuse; two arenas stop each gRPC worker thread from growing a heap of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def release_free_memory() -> None:
    """Returns freed heap pages to the OS (after start-up temporaries such as initial weights)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20, arenas: int = 2) -> bool:
    """Applies the settings; returns False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(opt, val) == 1 for opt, val in (
            (M_ARENA_MAX, arenas), (M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold)))
    except (OSError, AttributeError):
        return False
    if not ok:
        log.warning("mallopt refused a setting; large buffers may page-fault on every request")
    return ok
