"""The files beside a followed table image (serve-triton --follow), torch-free so the supervisor can
create them: the state (a sequence lock and the dense arch's version), the dense arch, the steps applied.

One writer process (image_follower) maps the image writable and rewrites rows in place; the 16-byte state
file holds a sequence lock (odd while rows are being written) and the dense arch's version. A worker reads
the sequence before and after a batch's lookup and looks up again when it changed, so no batch keeps a
half-written row and one delta entry's rows land together (what `serve`'s read-write lock gives, without
making the writer wait for readers in other processes). Word loads and stores are seen in the order
issued on x86-64 (TSO), where the CPU workers run.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

STATE_SUFFIX = ".state"  # sequence lock + dense version (ImageState)
DENSE_SUFFIX = ".dense.pt"  # the dense arch the follower last swapped in (TorchScript)
FOLLOW_SUFFIX = ".follow.json"  # the follower's applied steps (ListModels) and stream position (its restart)
T = TypeVar("T")


def follow_path(image: str | Path) -> Path:
    return Path(f"{image}{FOLLOW_SUFFIX}")


def state_path(image: str | Path) -> Path:
    return Path(f"{image}{STATE_SUFFIX}")


def dense_path(image: str | Path) -> Path:
    return Path(f"{image}{DENSE_SUFFIX}")


def remove_files(image: str | Path, keep_image: bool = False) -> None:
    """A followed image and the files beside it (what exists of them)."""
    paths = [state_path(image), dense_path(image), follow_path(image)]
    for path in paths if keep_image else [Path(image), *paths]:
        path.unlink(missing_ok=True)


class ImageState:
    """The state file of a followed image: word 0 the sequence lock, word 1 the dense arch's version."""

    SIZE = 16

    def __init__(self, image: str | Path, writable: bool = False) -> None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise RuntimeError(f"a followed table image needs x86-64's store order (this is {platform.machine()}): "
                               "the sequence lock has no memory fences")
        with open(state_path(image), "r+b" if writable else "rb") as f:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._map = mmap.mmap(f.fileno(), self.SIZE, flags=mmap.MAP_SHARED, prot=prot)
        self._words = np.frombuffer(self._map, dtype=np.uint64)  # a view: read-only for a reader

    @staticmethod
    def create(image: str | Path) -> Path:
        """A fresh state file (sequence 0, dense version 0), written before any worker maps the image."""
        path = state_path(image)
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        tmp.write_bytes(bytes(ImageState.SIZE))
        os.replace(tmp, path)
        return path

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """Rows written inside are seen by no lookup that started before and ends after them."""
        self._words[0] += np.uint64(1)  # odd: a write is in progress
        try:
            yield
        finally:
            self._words[0] += np.uint64(1)

    def read(self, lookup: Callable[[], T]) -> T:
        """`lookup()` again until no write began or ended while it ran."""
        while True:
            seq = int(self._words[0])
            if seq & 1:
                time.sleep(0.0001)  # a writer holds it: rows are being rewritten (an entry: microseconds)
                continue
            out = lookup()
            if int(self._words[0]) == seq:
                return out

    @property
    def dense_version(self) -> int:
        return int(self._words[1])

    def bump_dense(self) -> int:
        self._words[1] += np.uint64(1)
        return int(self._words[1])

    def recover(self) -> bool:
        """After the writer died: a sequence left odd (killed mid-write) would hold every reader forever.
        Makes it even again; the rows of that write may be half written until the next writer, which
        re-applies the entries past the position its predecessor saved, writes them again. True if it was odd."""
        if int(self._words[0]) & 1:
            self._words[0] += np.uint64(1)
            return True
        return False
