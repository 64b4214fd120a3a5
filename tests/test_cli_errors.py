"""Every command line refuses a bad config, plan or argument with one line on stderr naming the file and the
field, exit code 2, never a traceback. Each case runs the real CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")

FILES = {
    "mixed_dims.yaml": "dense: {dense_features: 4, bottom_mlp: [16, 8], top_mlp: [16, 1]}\ntables:\n"
                       "  - {name: users, num_rows: 200, dim: 8, features: [user]}\n"
                       "  - {name: items, num_rows: 500, dim: 16, features: [item]}\n",
    "broken.yaml": "tables: [\n",
    "bad_shard_plan.json": json.dumps({"version": 1, "num_shards": 2, "tables": [
        {"name": "users", "num_rows": 10, "dim": 8, "features": ["user"]}],
        "slices": [{"shard": 5, "slice": {"table": "users", "num_rows": 10, "num_cols": 8}}]}),
    "garbled_plan.json": json.dumps({"version": 1, "num_shards": "x"}),
    "negative_rows.json": json.dumps({"shard_id": 0, "tables": [{"name": "users", "num_rows": -5, "dim": 8}]}),
    "unknown_key.json": json.dumps({"shard_id": 0, "bogus_key": 1, "tables": [{"name": "u", "num_rows": 5, "dim": 8}]}),
}

# (command line, with {name} for the files above; what the one line must name besides the file, if anything)
CASES = {
    "coordinator plan propose: mixed dims": (
        ["coordinator.cli", "plan", "propose", "--config", "{mixed_dims.yaml}", "--shards", "2"],
        "mixed_dims.yaml", "tables: the dot interaction needs one embedding dim"),
    "coordinator plan propose: unparsable yaml": (
        ["coordinator.cli", "plan", "propose", "--config", "{broken.yaml}", "--shards", "2"], "broken.yaml", "line 2"),
    "coordinator plan show: shard outside the plan": (
        ["coordinator.cli", "plan", "show", "{bad_shard_plan.json}"], "bad_shard_plan.json", "shard 5 outside [0, 2)"),
    "coordinator plan diff: garbled": (
        ["coordinator.cli", "plan", "diff", "{garbled_plan.json}", "--against", "{bad_shard_plan.json}"],
        "garbled_plan.json", "num_shards"),
    "coordinator serve: garbled initial plan": (
        ["coordinator.cli", "serve", "--initial-plan", "{garbled_plan.json}", "--metrics-port", "-1"],
        "garbled_plan.json", "num_shards"),
    "coordinator serve: lease": (["coordinator.cli", "serve", "--lease-s", "-1"], None, "lease_s: must be > 0"),
    "trainer train: mixed dims": (
        ["trainer.cli", "train", "--config", "{mixed_dims.yaml}", "--plan", "{bad_shard_plan.json}", "--shards", "a:1"],
        "mixed_dims.yaml", "tables:"),
    "trainer plan: unparsable yaml": (
        ["trainer.cli", "plan", "--config", "{broken.yaml}", "--shards", "2"], "broken.yaml", "line 2"),
    "trainer plan: bad --kind": (
        ["trainer.cli", "plan", "--config", TINY, "--shards", "2", "--kind", "users=bogus"], None, "--kind"),
    "trainer export: no checkpoint": (
        ["trainer.cli", "export", "--checkpoint", "{missing_dir}", "--config", TINY, "--out", "out"], "missing_dir",
        "no LATEST"),
    "trainer shard-config: garbled plan": (
        ["trainer.cli", "shard-config", "--plan", "{garbled_plan.json}", "--shard", "0"], "garbled_plan.json",
        "num_shards"),
    "embedding-shard serve: negative rows": (
        ["embedding_service.cli", "serve", "--config", "{negative_rows.json}"], "negative_rows.json",
        "table 'users': num_rows"),
    "embedding-shard serve: unknown key": (
        ["embedding_service.cli", "serve", "--config", "{unknown_key.json}"], "unknown_key.json", "bogus_key"),
    "inference-gateway serve: not a package": (
        ["inference_gateway.cli", "serve", "--model", "{mixed_dims.yaml}", "--metrics-port", "-1"],
        "mixed_dims.yaml", "not a package"),
    "inference-gateway serve-triton: negative queue bound": (
        ["inference_gateway.cli", "serve-triton", "--max-queue", "-1"], None, "--max-queue: must be >= 0"),
    "inference-gateway serve-native: not a package": (
        ["inference_gateway.cli", "serve-native", "--model", "{mixed_dims.yaml}", "--metrics-port", "-1"],
        "mixed_dims.yaml", "not a package"),
    "inference-gateway serve-native: no workers": (
        ["inference_gateway.cli", "serve-native", "--model", "x", "--workers", "0"], None, "--workers: must be >= 1"),
    "inference-gateway serve-native: negative stream bound": (
        ["inference_gateway.cli", "serve-native", "--model", "x", "--max-streams-per-connection", "-1"], None,
        "--max-streams-per-connection: must be >= 0"),
    "inference-gateway serve-native: niceness past Linux's range": (
        ["inference_gateway.cli", "serve-native", "--model", "x", "--worker-nice", "20"], None,
        "--worker-nice: must be <= 19"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    for name, text in FILES.items():
        (root / name).write_text(text)
    return {**{name: str(root / name) for name in FILES}, "missing_dir": str(root / "missing_dir")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_refusal_is_one_line_naming_file_and_field_exit_2(case, files, tmp_path):
    argv, file, field = CASES[case]
    argv = [files[a[1:-1]] if a.startswith("{") else a for a in argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=180, env=env,
                         cwd=tmp_path)
    lines = out.stderr.splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    prog = case.split(":")[0]
    assert lines[0].startswith(f"{prog}: "), lines[0]
    if file is not None:
        assert files[file] in lines[0], lines[0]
    assert field in lines[0], lines[0]
