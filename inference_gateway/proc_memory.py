"""Resident (RSS) and proportional (PSS) memory of a process tree, from /proc (Linux).

PSS charges each shared page 1/N to each of the N processes mapping it, so the PSS of the whole
gateway counts the shared table image once however many workers map it; RSS counts it per worker.
"""

from __future__ import annotations

from pathlib import Path


def children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is `pid`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid and state != "Z":
            out.append(int(d.name))
    return out


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def rollup(pid: int) -> dict[str, int]:
    """{"rss": bytes, "pss": bytes} of one process (smaps_rollup)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            fields[key.lower()] = int(rest.split()[0]) * 1024
    return fields


def mapped(pid: int, path_suffix: str) -> dict[str, int]:
    """{"rss", "pss"} in bytes of the mappings of files whose path ends with `path_suffix`."""
    out = {"rss": 0, "pss": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[-1].endswith(path_suffix)
        elif inside and head and head[0] in ("Rss:", "Pss:"):
            out[head[0][:-1].lower()] += int(head[1]) * 1024
    return out


def total(pid: int) -> dict[str, int]:
    """{"rss", "pss", "processes"} summed over the tree under `pid`."""
    procs = tree(pid)
    parts = [rollup(p) for p in procs]
    return {"rss": sum(p["rss"] for p in parts), "pss": sum(p["pss"] for p in parts), "processes": len(procs)}
