"""Failpoints: named places in the code where a test makes a process fail on purpose (as etcd's gofail
and TiKV's fail-rs do), so a chaos test hits one exact phase instead of racing a timer.

`RECSYS_FAILPOINTS` is read once, at import: a list of `name=action` separated by `;`, e.g.
`RECSYS_FAILPOINTS="rollout.after_flip=kill"`. Actions:

  kill          SIGKILL this process at that point (what kill -9 from outside would do, but deterministic)
  sleep(S)      pause S seconds (float), then go on: widens a window for an outside fault
  error         raise FailpointError (a crash of that one operation)

Unset (production), `hit()` is one dict lookup on an empty dict. The failpoints in the code:

  rollout.prepared      every shard staged the new plan; no FENCE sent yet
  rollout.fence_reported  the first trainer's ReportFenced is recorded (not yet answered); the
                        others are stopping or reporting too
  rollout.migrating     the fence step and phase MIGRATING are logged; before the first pull
  rollout.after_flip    store.commit_rollout made the new plan current; no shard committed
  rollout.commit_shard  one shard committed the new plan (others may not have yet)
  shard.checkpoint      a shard took a Checkpoint request; nothing of it written yet
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass

ENV = "RECSYS_FAILPOINTS"
log = logging.getLogger(__name__)
_ACTION = re.compile(r"^(kill|error|sleep\((\d+(?:\.\d+)?)\))$")


class FailpointError(RuntimeError):
    """Raised by a failpoint set to `error`."""


@dataclass(frozen=True)
class Action:
    kind: str  # "kill", "sleep" or "error"
    seconds: float = 0.0


def parse(spec: str) -> dict[str, Action]:
    """`name=action;...` -> actions; ValueError naming the bad entry (a typo must not silently do nothing)."""
    out: dict[str, Action] = {}
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        name, sep, action = (p.strip() for p in item.partition("="))
        m = _ACTION.match(action)
        if not sep or not name or m is None:
            raise ValueError(f"{ENV}: bad entry {item!r}: expected name=kill|error|sleep(SECONDS)")
        out[name] = Action("sleep", float(m.group(2))) if m.group(2) else Action(m.group(1))
    return out


_ACTIVE: dict[str, Action] = parse(os.environ.get(ENV, ""))


def hit(name: str) -> None:
    """Runs the action set for `name`, if any."""
    action = _ACTIVE.get(name) if _ACTIVE else None
    if action is None:
        return
    log.warning("failpoint %s: %s", name, action.kind)
    if action.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.kind == "sleep":
        time.sleep(action.seconds)
    else:
        raise FailpointError(f"failpoint {name}")
