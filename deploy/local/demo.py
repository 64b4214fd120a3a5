"""The local demo: shard services and a DLRM trainer as local processes, with what they measured.

    python -m deploy.local.demo [--steps 60] [--row-cap 100000] [--wire fp16] [--train-steps 800] [--json]

Part 1 launches `embedding-shard serve` (Criteo-Kaggle-shaped tables, row-wise Adagrad), drives
pipelined Lookup/Update steps against it, checkpoints, kills -9 and restarts the shard, restores, and
verifies the weights survived. Part 2 shards the tiny DLRM config over two shard processes (row-wise,
column-wise and table-wise tables), trains it on synthetic teacher data through them (pipelined,
sync), and compares its held-out AUC with the teacher's, the best reachable. Part 3 runs the job under
the coordinator (Redis, membership) with two trainer processes and re-shards it live from 2 to 3
shards a third of the way in (deploy/local/demo_reshard.py). Part 4 exports that job's last checkpoint
as a quantized package, serves it with `inference-gateway serve-native` (held-out AUC through Predict
and through the Open Inference Protocol), measures QPS and latency under load on both, and hot-swaps
versions under load (deploy/local/demo_serving.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from embedding_service.allocator import tune_allocator
from embedding_service.process import launch
from protos.shard_client import ShardClient
from trainer import criteo_kaggle as criteo

WIRE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--pooling", type=int, default=1)
    p.add_argument("--row-cap", type=int, default=100_000, help="rows per table at most (benchmarks use 500000)")
    p.add_argument("--wire", choices=list(WIRE), default="fp16", help="dtype of embeddings/gradients on the wire")
    p.add_argument("--train-steps", type=int, default=800, help="DLRM training steps (part 2; 0 skips it)")
    p.add_argument("--job-steps", type=int, default=600,
                   help="part 3: steps of the coordinated job re-sharded live at a third (0 skips it)")
    p.add_argument("--serve-seconds", type=float, default=3.0,
                   help="part 4: export the job's checkpoint (INT8), serve it, drive load this long (0 skips it)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = p.parse_args(argv)
    tune_allocator()

    work = Path(tempfile.mkdtemp(prefix="recsys-demo-"))
    table_defs = criteo.tables(cap=args.row_cap)
    config = {"tables": table_defs, "mode": "sync", "num_trainers": 1, "seed": 0}
    t0 = time.perf_counter()
    shard = launch(config, workdir=work / "shard")
    start_s = time.perf_counter() - t0
    summary: dict = {"shard_address": shard.address, "metrics": f"http://127.0.0.1:{shard.metrics_port}/metrics",
                     "tables": len(table_defs), "rows": sum(t["num_rows"] for t in table_defs),
                     "shard_start_s": round(start_s, 2)}
    gen = torch.Generator().manual_seed(0)
    feats = criteo.features()
    batches = [criteo.batch(gen, args.batch, args.pooling, table_defs) for _ in range(4)]
    wire = WIRE[args.wire]
    try:
        with ShardClient(shard.address) as client:
            lat = []
            t_lookup = time.perf_counter()
            pending = client.lookup_async(feats, args.batch, *batches[0], step=0, wire_dtype=wire)
            start = time.perf_counter()
            for step in tqdm(range(args.steps), desc="train steps", unit="step", disable=args.json):
                res = pending.result()
                lat.append(time.perf_counter() - t_lookup)
                # a stand-in for the dense backward: pull every pooled embedding towards zero
                upd = client.update_async(res.handle, res.embeddings, wire_dtype=wire)
                if step + 1 < args.steps:
                    t_lookup = time.perf_counter()
                    pending = client.lookup_async(feats, args.batch, *batches[(step + 1) % 4], step=step + 1,
                                                  wire_dtype=wire)
                upd.result()
            elapsed = time.perf_counter() - start
            norm_after = client.lookup(feats, args.batch, *batches[0], no_grad=True).embeddings.norm().item()
            info = client.info()
            ckpt = work / "checkpoint"
            t1 = time.perf_counter()
            client.checkpoint(str(ckpt), step=args.steps - 1)
            ckpt_s = time.perf_counter() - t1
            probe = client.lookup_rows("t2", torch.arange(1000))
        q = statistics.quantiles(lat, n=100)
        summary.update({
            "steps": args.steps, "batch": args.batch, "pooling": args.pooling, "wire": args.wire,
            "samples_per_s": round(args.steps * args.batch / elapsed), "lookup_p50_ms": round(q[49] * 1000, 2),
            "lookup_p99_ms": round(q[98] * 1000, 2), "pooled_norm_after": round(norm_after, 4),
            "weight_bytes": info.weight_bytes, "optimizer_bytes": info.optimizer_bytes,
            "resident_bytes": info.resident_bytes, "checkpoint_s": round(ckpt_s, 2)})
        shard.kill()  # kill -9: the checkpoint must carry everything
        shard = launch(config, workdir=work / "shard-restarted")
        with ShardClient(shard.address) as client:
            t2 = time.perf_counter()
            client.restore(str(ckpt))
            summary["restore_s"] = round(time.perf_counter() - t2, 2)
            summary["restored_identical"] = bool(torch.equal(client.lookup_rows("t2", torch.arange(1000)), probe))
    finally:
        shard.terminate()
    if args.train_steps:
        summary.update(train_dlrm(args.train_steps, work, quiet=args.json))
    if args.job_steps:
        from deploy.local.demo_reshard import run_reshard_demo

        job = run_reshard_demo(work / "job", steps=args.job_steps, quiet=args.json)
        checkpoint, config = job.pop("checkpoint"), job.pop("config")
        summary.update(job)
        summary["job_checkpoint"] = checkpoint
        if args.serve_seconds:
            from deploy.local.demo_serving import run_serving_demo, served_ok

            served = run_serving_demo(Path(checkpoint), None, Path(config), work / "serving",
                                      seconds=args.serve_seconds, data_seed=1, quiet=args.json)
            summary.update({f"serve_{k}" if not k.startswith("serve") else k: v for k, v in served.items()})
            summary["serve_ok"] = served_ok(served)
    if args.json:
        print(json.dumps(summary))
    else:
        width = max(len(k) for k in summary)
        for k, v in summary.items():
            print(f"{k:<{width}}  {v}")
    return 0 if summary.get("restored_identical") and summary.get("serve_ok", True) else 1


def train_dlrm(steps: int, work: Path, quiet: bool, batch_size: int = 256) -> dict:
    """Part 2: the tiny DLRM trained through two shard processes; held-out AUC against the teacher's."""
    from protos import common_pb2
    from protos.model_config import ModelConfig
    from protos.plan import shard_config, simple_plan
    from trainer.data import HELDOUT, SyntheticData, auc
    from trainer.train import ShardedTrainer

    model = ModelConfig.load(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    plan = simple_plan(model, 2, kinds={"users": common_pb2.ROW_WISE, "items": common_pb2.COLUMN_WISE})
    shards = []
    try:
        for s in range(2):
            shards.append(launch(shard_config(plan, s, seed=1), workdir=work / f"dlrm-shard{s}"))
        trainer = ShardedTrainer(model, plan, [s.address for s in shards], seed=1)
        data = SyntheticData(model, seed=1)
        start = time.perf_counter()
        bar = tqdm(total=steps, desc="DLRM through 2 shards", unit="step", disable=quiet)
        for res in trainer.train(data.batches(batch_size, steps)):
            bar.update(1)
            if res.step % 50 == 0:
                bar.set_postfix(loss=f"{res.loss:.4f}")
        bar.close()
        elapsed = time.perf_counter() - start
        scores, labels = [], []
        for b in data.batches(2048, 4, stream=HELDOUT):
            scores.append(trainer.predict(b, steps))
            labels.append(b.labels)
        trainer.close()
        return {"dlrm_train_steps": steps, "dlrm_samples_per_s": round(steps * batch_size / elapsed),
                "dlrm_heldout_auc": round(auc(torch.cat(scores), torch.cat(labels)), 4),
                "teacher_heldout_auc": round(data.teacher_auc(8192), 4)}
    finally:
        for s in shards:
            s.terminate()


if __name__ == "__main__":
    sys.exit(main())
