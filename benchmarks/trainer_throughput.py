"""DLRM training throughput: in-process fbgemm TBE (the limit) against 1 trainer + 2 shard processes.

Prints one JSON line per result; variants measured round by round, medians reported:
  in_process         - one process: fbgemm SplitTableBatchedEmbeddingBagsCodegen + the dense DLRM
  grpc_2shards       - one trainer, tables table-wise over two shard processes, gRPC, pipelined, sync
  collective_2shards - the same over all_to_all_single in one gloo group with the shards (float32)

    python -m benchmarks.trainer_throughput --pooling 1 20 --wire fp32 fp16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
WIRE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


class InProcess:
    """The same model trained in one process with fbgemm TBE directly."""

    def __init__(self, model_cfg) -> None:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        from trainer.model import DenseDLRM

        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(t.num_rows, t.dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for t in model_cfg.tables],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.05)
        self.model = DenseDLRM(model_cfg)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=model_cfg.dense_lr)

    def step(self, batch) -> None:
        sp = batch.sparse
        emb = self.tbe(sp.values, torch.ops.fbgemm.asynchronous_complete_cumsum(sp.lengths))
        loss = F.binary_cross_entropy_with_logits(self.model(batch.dense, emb), batch.labels)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "criteo_kaggle.yaml"))
    p.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    p.add_argument("--wire", nargs="+", default=["fp32", "fp16"], choices=list(WIRE))
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after 3 warm-up steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-collective", action="store_true", help="skip the collective transport")
    p.add_argument("--dense-lr", type=float, default=0.001,
                   help="the config's 0.1 diverges to NaN at pooling 20 (the shards then refuse the gradients)")
    p.add_argument("--embedding-lr", type=float, default=0.01)
    args = p.parse_args(argv)

    from embedding_service.allocator import tune_allocator
    from embedding_service.process import launch
    from protos.model_config import ModelConfig
    from protos.plan import shard_config, simple_plan
    from trainer.data import SyntheticData
    from trainer.train import ShardedTrainer, init_distributed

    tune_allocator()
    model_cfg = ModelConfig.load(args.config)
    model_cfg.dense_lr = args.dense_lr
    for t in model_cfg.tables:
        t.optimizer.learning_rate = args.embedding_lr
    plan = simple_plan(model_cfg, 2)
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))

    def start_shards(name: str, collective: bool) -> list:
        out = []
        for s in range(2):
            cfg = shard_config(plan, s, collective=collective)
            out.append(launch(cfg, workdir=work / f"{name}{s}", env=dict(os.environ)))
        return out

    shards = start_shards("grpc", False)
    local = InProcess(model_cfg)
    trainers = {f"grpc_2shards/{w}": ShardedTrainer(model_cfg, plan, [s.address for s in shards], wire_dtype=WIRE[w])
                for w in args.wire}
    if not args.no_collective:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))
        coll = start_shards("collective", True)
        shards += coll
        init_distributed(0, 1, num_shards=2)
        trainers["collective_2shards/fp32"] = ShardedTrainer(model_cfg, plan, [s.address for s in coll],
                                                             transport="collective")
    step = 0
    try:
        for pooling in args.pooling:
            data = SyntheticData(model_cfg, seed=pooling, pooling_factor=pooling)
            batches = list(data.batches(args.batch, 4))
            rates: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for i in range(3):
                    local.step(batches[i % 4])
                t0 = time.perf_counter()
                for i in range(args.steps):
                    local.step(batches[i % 4])
                rates.setdefault("in_process", []).append(args.steps * args.batch / (time.perf_counter() - t0))
                for key, trainer in trainers.items():
                    feed = (batches[i % 4] for i in range(args.steps + 3))
                    it = trainer.train(feed, first_step=step)
                    for _ in range(3):
                        next(it)
                    t0 = time.perf_counter()
                    for _ in it:
                        pass
                    rates.setdefault(key, []).append(
                        args.steps * args.batch / (time.perf_counter() - t0))
                    step += args.steps + 3
            base = statistics.median(rates["in_process"])
            for key, vals in rates.items():
                med = statistics.median(vals)
                rec = {"bench": "trainer_throughput", "variant": key, "pooling": pooling, "batch": args.batch,
                       "samples_per_s": round(med), "runs": [round(v) for v in vals],
                       "ratio_vs_in_process": round(med / base, 3)}
                if key != "in_process":
                    rec["target"] = 0.9 if key.startswith("collective") else 0.8
                emit(rec)
    finally:
        for t in trainers.values():
            t.close()
        for s in shards:
            s.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
