"""`trainer`: train a DLRM against running shard services (torchrun-compatible for several trainers)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

WIRE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description="Train a DLRM whose embedding tables live in the "
                                "embedding shard services.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="sync data-parallel training (rank and world size from torchrun's env)",
                       description="Each trainer takes its part of every global batch; dense gradients are "
                                   "all-reduced (DDP, gloo on CPU); the shards merge the trainers' embedding "
                                   "updates of a step into one.")
    t.add_argument("--config", required=True, help="model YAML (tables, dense architecture)")
    t.add_argument("--plan", required=True, help="sharding plan JSON (ShardingPlan)")
    t.add_argument("--shards", required=True, help="comma-separated HOST:PORT of shard 0, 1, ...")
    t.add_argument("--data", default="synthetic", help="synthetic (teacher DLRM with Zipf ids)")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=256, help="global batch size (split over trainers)")
    t.add_argument("--first-step", type=int, default=0, help="step number of the first step")
    t.add_argument("--seed", type=int, default=0, help="dense init and data seed")
    t.add_argument("--wire", choices=list(WIRE), default="fp32", help="embedding/gradient dtype on the wire")
    t.add_argument("--out", help="directory for the final dense state (rank 0)")
    t.add_argument("--json", action="store_true", help="one JSON line per logged step instead of a progress bar")
    return p


def train(args: argparse.Namespace) -> int:
    from trainer.config import ModelConfig
    from trainer.data import SyntheticData
    from trainer.plan import load_plan
    from trainer.train import ShardedTrainer, init_distributed

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by WORLD_SIZE {world}")
    if args.data != "synthetic":
        raise SystemExit(f"--data {args.data!r}: only 'synthetic' is wired into `trainer train` so far")
    model_cfg = ModelConfig.load(args.config)
    plan = load_plan(args.plan)
    init_distributed(world)
    trainer = ShardedTrainer(model_cfg, plan, args.shards.split(","), rank=rank, world_size=world, seed=args.seed,
                             wire_dtype=WIRE[args.wire])
    data = SyntheticData(model_cfg, seed=args.seed)
    sizes = [args.batch_size // world] * world
    bar = tqdm(total=args.steps, desc=f"trainer {rank}", unit="step", disable=args.json or rank != 0)
    start = time.perf_counter()
    loss = float("nan")
    for i, batch in enumerate(data.batches(args.batch_size, args.steps, start=args.first_step)):
        res = trainer.train_step(batch.split(sizes)[rank], args.first_step + i)
        loss = res.loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if args.json and rank == 0:
            print(json.dumps({"step": res.step, "loss": loss}), flush=True)
    bar.close()
    elapsed = time.perf_counter() - start
    if rank == 0 and args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(trainer.model.state_dict(), out / "dense.pt")
    if rank == 0:
        print(json.dumps({"event": "done", "steps": args.steps, "loss": loss,
                          "samples_per_s": round(args.steps * args.batch_size / elapsed, 1)}), flush=True)
    trainer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
