"""Confined paths and precise statuses for file errors, the same way for every server that touches files.

A server reads and writes only under the roots it was started with (a shard's checkpoint root, the
gateway's model store). A name from a request is resolved under its root: a relative name resolves
under it, an absolute one must already lie inside it; `..` components, a symlink that leads out of the
root, an empty name, a NUL byte or a name longer than the filesystem allows are refused as
INVALID_ARGUMENT naming the request field, before anything is touched. Every OSError a server meets
while working on such a path becomes a precise status (`status_of_oserror`), never INTERNAL.

The check resolves symlinks at the time of the request (`os.path.realpath`) and the server then works
on the resolved path; a symlink an attacker plants inside the root between the check and the use is
outside this model (the root belongs to the server's own user).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import grpc

NAME_MAX = 255  # bytes per path component (ext4, xfs, tmpfs)
PATH_MAX = 4096


class PathRefused(Exception):
    """A request's path (or what the filesystem said about it) as the gRPC status it deserves."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _shown(name: str, limit: int = 80) -> str:
    """The name as messages quote it: a 300-character name is not echoed whole."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def confine(root: str | Path, name: str, field: str, *, what: str = "root") -> Path:
    """The resolved path of `name` under `root`, or PathRefused(INVALID_ARGUMENT, "<field>: ...").

    `root` itself must exist (servers create theirs at start). Nothing is created or changed here.
    """
    if not name:
        raise PathRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: empty")
    if "\x00" in name:
        raise PathRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: contains a NUL byte")
    raw = os.fsencode(name)
    if len(raw) >= PATH_MAX or any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise PathRefused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field}: {_shown(name)} is too long (at most {NAME_MAX} bytes per component)")
    given = Path(name)
    if ".." in given.parts:
        raise PathRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {_shown(name)} must not contain '..'")
    real_root = os.path.realpath(root)
    candidate = given if given.is_absolute() else Path(real_root) / given
    resolved = os.path.realpath(candidate)  # follows every symlink that exists now
    if os.path.commonpath([resolved, real_root]) != real_root:
        kind = "an absolute path" if given.is_absolute() else "a symlink that leads"
        raise PathRefused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field}: {_shown(name)} is {kind} outside the server's {what}")
    return Path(resolved)


# errno -> (status, what the caller should understand)
_ERRNO_STATUS: dict[int, grpc.StatusCode] = {
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.ENOTDIR: grpc.StatusCode.FAILED_PRECONDITION,  # a file where a directory is expected
    errno.EISDIR: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EEXIST: grpc.StatusCode.FAILED_PRECONDITION,
    errno.ENOTEMPTY: grpc.StatusCode.FAILED_PRECONDITION,
    errno.ENAMETOOLONG: grpc.StatusCode.INVALID_ARGUMENT,
    errno.EINVAL: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ELOOP: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EDQUOT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EFBIG: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EMFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EROFS: grpc.StatusCode.PERMISSION_DENIED,
    errno.EIO: grpc.StatusCode.UNAVAILABLE,  # the device failed; a retry elsewhere may work
    errno.EBUSY: grpc.StatusCode.UNAVAILABLE,
    errno.EAGAIN: grpc.StatusCode.UNAVAILABLE,
    errno.EXDEV: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of_oserror(e: OSError, field: str, name: str | None = None) -> PathRefused:
    """The precise status of an OSError met while serving `field` (never INTERNAL; unknown errnos are
    FAILED_PRECONDITION). The message names the field, the request's own name and the errno, not the
    server's paths."""
    code = _ERRNO_STATUS.get(e.errno or 0, grpc.StatusCode.FAILED_PRECONDITION)
    label = errno.errorcode.get(e.errno or 0, "OSError")
    reason = e.strerror or str(e)
    shown = f" {_shown(name)}" if name else ""
    return PathRefused(code, f"{field}{shown}: {reason} ({label})")


def ensure_root(root: str | Path, what: str) -> Path:
    """Creates the root at start (a server refuses to start on a root it cannot create); returns it resolved."""
    path = Path(root).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{what} {str(root)!r}: {e.strerror or e}") from None
    if not path.is_dir():
        raise OSError(f"{what} {str(root)!r}: not a directory")
    return Path(os.path.realpath(path))
