"""Failpoints (protos/failpoints.py): the spec is parsed strictly, and each action does what it says in a
real child process (kill is a real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from protos.failpoints import ENV, Action, parse

ROOT = Path(__file__).resolve().parent.parent


def test_parse_actions_and_refuse_typos():
    assert parse("") == {}
    assert parse(" a.b=kill ; c=sleep(0.25);d=error;") == {
        "a.b": Action("kill"), "c": Action("sleep", 0.25), "d": Action("error")}
    for bad in ("a.b", "a=kil", "=kill", "a=sleep()", "a=sleep(x)"):
        with pytest.raises(ValueError, match=f"{ENV}: bad entry"):
            parse(bad)


def run(spec: str) -> subprocess.CompletedProcess:
    code = ("from protos import failpoints\n"
            "print('before', flush=True)\n"
            "failpoints.hit('x.y')\n"
            "print('after', flush=True)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, ENV: spec})


def test_actions_in_a_real_process():
    killed = run("x.y=kill")
    assert killed.returncode == -signal.SIGKILL and killed.stdout == "before\n"
    failed = run("x.y=error")
    assert failed.returncode == 1 and "FailpointError: failpoint x.y" in failed.stderr
    assert run("x.y=sleep(0.1)").stdout == "before\nafter\n"
    assert run("other=kill").stdout == "before\nafter\n"  # only the named point fires
    bad = run("x.y=boom")
    assert bad.returncode == 1 and "bad entry 'x.y=boom'" in bad.stderr  # a typo fails at start-up
