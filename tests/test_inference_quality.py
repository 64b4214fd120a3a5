"""Export from a real training checkpoint: FP32 equals the trainer, INT8/INT4 meet size and AUC budgets.

A DLRM is trained through two real shard processes on synthetic teacher data (row-wise, column-wise,
table-wise and data-parallel tables, so export must reassemble every kind of slice), checkpointed,
and exported with `trainer export` at FP32, INT8 and INT4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embedding_service.process import launch
from inference_gateway.model import ServingModel
from protos import common_pb2
from protos.model_config import ModelConfig
from protos.package import load_package
from protos.plan import shard_config, simple_plan
from trainer import checkpoint
from trainer.cli import main as trainer_main
from trainer.data import HELDOUT, SyntheticData, auc
from trainer.train import ShardedTrainer

CONFIG = {
    "dense": {"dense_features": 8, "bottom_mlp": [32, 32], "top_mlp": [32, 1], "dense_lr": 0.1},
    "tables": [
        {"name": "users", "num_rows": 3000, "dim": 32, "features": ["user"],
         "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.1}},
        {"name": "items", "num_rows": 4000, "dim": 32, "features": ["item", "last_item"],
         "optimizer": {"type": "exact_adagrad", "learning_rate": 0.1}},
        {"name": "ads", "num_rows": 2000, "dim": 32, "features": ["ad"],
         "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.1}},
        {"name": "cities", "num_rows": 60, "dim": 32, "features": ["city"],
         "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.1}},
    ],
}
MODEL = ModelConfig.from_dict(CONFIG)
PLAN = simple_plan(MODEL, 2, kinds={"users": common_pb2.ROW_WISE, "items": common_pb2.COLUMN_WISE,
                                    "cities": common_pb2.DATA_PARALLEL})
STEPS, BATCH = 200, 512


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    (root / "model.yaml").write_text(json.dumps(CONFIG))  # JSON is YAML
    shards = [launch(shard_config(PLAN, s, seed=1), workdir=root / f"s{s}") for s in range(2)]
    try:
        trainer = ShardedTrainer(MODEL, PLAN, [s.address for s in shards], seed=1)
        data = SyntheticData(MODEL, seed=1, pooling_factor=2)
        for _ in trainer.train(data.batches(BATCH, STEPS)):
            pass
        trainer.wait_updates()
        checkpoint.save(trainer, root / "ckpt", STEPS - 1, STEPS)
        heldout = list(data.batches(2048, 4, stream=HELDOUT))
        trainer_scores = torch.cat([trainer.predict(b, 0) for b in heldout])
        trainer.close()
    finally:
        for s in shards:
            s.kill()
    packages = {}
    for q in ("fp32", "int8", "int4"):
        out = root / f"{q}.pkg"
        assert trainer_main(["export", "--checkpoint", str(root / "ckpt"), "--config", str(root / "model.yaml"),
                             "--quantize", q, "--out", str(out), "--json"]) == 0
        packages[q] = load_package(out)
    return heldout, trainer_scores, packages


def _served(pkg, heldout) -> torch.Tensor:
    model = ServingModel(pkg)
    return torch.cat([model.scores(b.dense, b.sparse.lengths, b.sparse.values) for b in heldout])


def test_fp32_package_equals_the_trainers_model(trained):
    heldout, trainer_scores, packages = trained
    served = _served(packages["fp32"], heldout)
    assert torch.allclose(served, trainer_scores, atol=1e-5, rtol=0), float((served - trainer_scores).abs().max())
    assert packages["fp32"].manifest["source"]["step"] == STEPS - 1


def test_quantized_packages_meet_size_and_auc_budgets(trained):
    heldout, _, packages = trained
    labels = torch.cat([b.labels for b in heldout])
    aucs = {q: auc(_served(p, heldout), labels) for q, p in packages.items()}
    fp32_bytes = packages["fp32"].table_bytes
    ratios = {q: p.table_bytes / fp32_bytes for q, p in packages.items()}
    assert aucs["fp32"] > 0.6, aucs  # trained: well above chance, so the deltas mean something
    assert ratios["int8"] <= 0.30 and abs(aucs["int8"] - aucs["fp32"]) <= 0.001, (ratios, aucs)
    assert ratios["int4"] <= 0.17 and abs(aucs["int4"] - aucs["fp32"]) <= 0.005, (ratios, aucs)
    assert aucs["int4"] != aucs["fp32"]  # quantization did change the scores


def test_export_refuses_a_corrupt_checkpoint(trained, tmp_path):
    import shutil

    packages = trained[2]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(packages["fp32"].path.parent / "ckpt", ckpt)
    step = checkpoint.latest(ckpt)
    victim = next(p for p in sorted((step / "shard-0").iterdir()) if p.name.endswith("weights.bin"))
    data = bytearray(victim.read_bytes())
    data[7] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"weights\.bin: size or sha256 mismatch"):
        trainer_main(["export", "--checkpoint", str(ckpt), "--config", str(packages["fp32"].path.parent / "model.yaml"),
                      "--out", str(tmp_path / "out")])



@pytest.mark.parametrize("frontend", [
    "serve",
    "serve-triton",
    "serve-native",
])
def test_serving_demo_exports_serves_swaps_and_measures(trained, tmp_path, frontend):
    import subprocess
    import sys

    root = trained[2]["fp32"].path.parent
    out = subprocess.run([sys.executable, "-m", "deploy.local.demo_serving", "--checkpoint", str(root / "ckpt"),
                          "--config", str(root / "model.yaml"), "--workdir", str(tmp_path), "--seconds", "0.5",
                          "--concurrency", "8", "--frontend", frontend, "--json"], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parent.parent)
    result = json.loads(out.stdout.splitlines()[-1])
    assert out.returncode == 0, (result.get("failures"), out.stderr[-3000:])
    assert result["exit_code"] == 0 and result["step"] == STEPS - 1 and result["frontend"] == frontend
    for load in ("load", "load_oip"):
        assert result[load]["ok"] > 0 and not result[load]["errors"]
    assert not result["hot_swap"]["errors"] and result["hot_swap"]["models"] == ["dlrm v2"]
    assert result["hot_swap"]["predict"]["ok"] > 0 and result["hot_swap"]["oip"]["ok"] > 0
    assert result["served_auc_int8"] == result["served_auc_int8_oip"]  # one model, two protocols
    assert abs(result["served_auc_int8"] - result["served_auc_fp32"]) <= 0.002
