"""The local demo: start an embedding shard process, train its tables through gRPC, report figures.

    python -m deploy.local.demo [--steps 60] [--row-cap 100000] [--wire fp16] [--json]

It launches `embedding-shard serve` as a child process (Criteo-Kaggle-shaped tables, row-wise
Adagrad), drives pipelined Lookup/Update steps against it with a progress bar, checkpoints, kills and
restarts the shard, restores, verifies the weights survived, and prints what it measured.
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

from benchmarks import criteo
from embedding_service.allocator import tune_allocator
from embedding_service.client import ShardClient
from embedding_service.process import launch

WIRE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--pooling", type=int, default=1)
    p.add_argument("--row-cap", type=int, default=100_000, help="rows per table at most (benchmarks use 500000)")
    p.add_argument("--wire", choices=list(WIRE), default="fp16", help="dtype of embeddings/gradients on the wire")
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
    if args.json:
        print(json.dumps(summary))
    else:
        width = max(len(k) for k in summary)
        for k, v in summary.items():
            print(f"{k:<{width}}  {v}")
    return 0 if summary.get("restored_identical") else 1


if __name__ == "__main__":
    sys.exit(main())
