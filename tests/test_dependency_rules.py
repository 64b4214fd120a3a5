"""The dependency rules of DESIGN.md are contracts (`lint-imports`, configured in pyproject.toml): they
hold on this tree, and a forbidden import planted in a copy of it breaks them, so a rule cannot
silently stop being checked."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["protos", "embedding_service", "trainer", "coordinator", "inference_gateway", "deploy", "benchmarks"]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    assert LINT.exists(), f"{LINT}: import-linter is not installed (pip install -e '.[dev]')"
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / "pyproject.toml", dst)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_contracts_hold_on_this_tree():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("where, line, broken", [
    # a component reaching into another's private module
    ("trainer/local.py", "from embedding_service.tables import ShardTables",
     "trainer.local -> embedding_service.tables"),
    # the coordinator and the trainer know each other only through protos
    ("coordinator/rollout.py", "from trainer.router import Router", "coordinator.rollout -> trainer.router"),
    # not even a component's client: the clients every component shares live in protos
    ("coordinator/rollout.py", "from inference_gateway.client import GatewayClient",
     "coordinator.rollout -> inference_gateway.client"),
    # protos is below every component
    ("protos/plan.py", "from coordinator.cost import CostModel", "protos.plan -> coordinator.cost"),
    # nothing imports deploy or benchmarks
    ("trainer/job.py", "from benchmarks import migration", "trainer.job -> benchmarks.migration"),
    # no cycles between the files of a package
    ("protos/durable.py", "import protos.shard_checkpoint", "protos"),
])
def test_a_forbidden_import_breaks_a_contract(tree_copy, where, line, broken):
    path = tree_copy / where
    original = path.read_text()
    try:
        path.write_text(original + f"\n{line}  # noqa\n")
        r = lint(tree_copy)
    finally:
        path.write_text(original)
    assert r.returncode != 0, r.stdout
    assert "BROKEN" in r.stdout and broken in r.stdout, r.stdout
