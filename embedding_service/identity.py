"""A shard's id from its StatefulSet pod's ordinal.

A StatefulSet names its pods `<set>-0`, `<set>-1`, ... and sets the hostname to that name, so the
ordinal is stable across restarts and is what the coordinator maps to a shard id.
"""

from __future__ import annotations

import os
import re

_ORDINAL = re.compile(r"-(\d+)$")


def ordinal_from_hostname(hostname: str | None = None) -> int:
    """The trailing `-N` of `hostname` (default: $HOSTNAME, else the kernel's hostname)."""
    name = hostname if hostname is not None else os.environ.get("HOSTNAME") or os.uname().nodename
    match = _ORDINAL.search(name)
    if match is None:
        raise ValueError(f"hostname {name!r} does not end in -N (a StatefulSet pod's ordinal); "
                         "give --shard-id instead")
    return int(match.group(1))
