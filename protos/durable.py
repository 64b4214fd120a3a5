"""Durable files, one way for every component: atomic writes, directory fsync, checksums.

A reader must see a file either whole and old or whole and new (temp file, fsync, rename, fsync of the
directory), and verify what it reads against a sha256 written beside it. Shard checkpoints, job
checkpoints and model packages all rest on these three functions.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Makes a rename or new entry in `path` durable (a crash cannot leave the old directory listing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes | memoryview) -> None:
    """Writes `data` to a temp file beside `path`, fsyncs it and renames it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (files may be larger than memory allows twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
