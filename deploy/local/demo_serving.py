"""The serving part of the demo: export a training checkpoint, serve it, drive load, print QPS and latency.

    python -m deploy.local.demo_serving [--steps 300] [--seconds 3] [--json]

Standalone it first trains the tiny DLRM through two shard processes and checkpoints it (or serves
`--checkpoint DIR --config YAML`); the main demo calls `run_serving_demo` with its own checkpoint.
Exports the checkpoint at INT8 (and FP32 for comparison), starts `inference-gateway serve`,
checks the served held-out AUC, hot-swaps to a second version under load, and measures one-sample
requests at concurrency 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from inference_gateway.client import GatewayClient, build_request, scores_of
from inference_gateway.loadgen import closed_loop
from inference_gateway.process import launch
from protos.model_config import ModelConfig
from trainer.data import HELDOUT, SyntheticData, auc
from trainer.export import export_package, read_checkpoint, table_dtypes

ROOT = Path(__file__).resolve().parent.parent.parent


def run_serving_demo(checkpoint_dir: Path, plan_path: Path | None, config_path: Path, workdir: Path, *,
                     seconds: float = 3.0, concurrency: int = 32, data_seed: int = 1, quiet: bool = False) -> dict:
    """Exports `checkpoint_dir` (FP32 and INT8), serves the INT8 package, and returns what it measured.

    `plan_path` is not needed (the checkpoint's shards record their slices) and is accepted for callers
    that have one. `data_seed` is the synthetic data seed the job trained on (for the held-out AUC).
    """
    del plan_path
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.load(config_path)
    say = (lambda *_: None) if quiet else (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    model = read_checkpoint(checkpoint_dir, config)
    pkgs = {q: export_package(model, workdir / f"model-{q}.pkg", dtypes=table_dtypes(config, q, []), version=v,
                              overwrite=True, source={"checkpoint": str(checkpoint_dir)})
            for v, q in ((1, "int8"), (2, "fp32"))}
    say(f"exported step {model.step} to {', '.join(str(p) for p in pkgs.values())} in "
        f"{time.perf_counter() - t0:.1f}s")
    gw = launch(["--model", str(pkgs["int8"]), "--max-wait-ms", "1", "--model-store", str(workdir)],
                workdir=workdir / "gateway")
    result: dict = {"address": gw.address, "step": model.step}
    try:
        with GatewayClient(gw.address) as client:
            data = SyntheticData(config, seed=data_seed)
            heldout = list(data.batches(1024, 4, stream=HELDOUT))
            reqs = [build_request(b.dense.numpy(), b.sparse.lengths.numpy(), b.sparse.values.numpy())
                    for b in heldout]
            labels = torch.cat([b.labels for b in heldout])
            served = np.concatenate([scores_of(client.predict_request(r)) for r in reqs])
            result["served_auc_int8"] = round(auc(torch.from_numpy(served), labels), 4)
            say(f"gateway {gw.address}: held-out AUC of the served INT8 model {result['served_auc_int8']}")
            first = heldout[0]
            parts = first.sparse.split([1] * 64 + [1024 - 64])[:64]
            one = [build_request(first.dense[i : i + 1].numpy(), s.lengths.numpy(), s.values.numpy())
                   .SerializeToString() for i, s in enumerate(parts)]
            load = asyncio.run(closed_loop(gw.address, one, concurrency, seconds, 1))
            result["load"] = {"concurrency": concurrency, **load}
            say(f"one sample per request, {concurrency} concurrent clients: {load['requests_per_s']:.0f} requests/s, "
                f"p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, errors {load['errors'] or 0}")
            # hot swap: version 2 (FP32) becomes the default while requests keep flowing
            swap = asyncio.run(_swap_under_load(gw.address, one, str(pkgs["fp32"]), concurrency, seconds))
            result["hot_swap"] = swap
            say(f"hot swap to v2 under load: {swap['ok']} requests, errors {swap['errors'] or 0}; now serving "
                f"{swap['models']}")
            fp32 = np.concatenate([scores_of(client.predict_request(r)) for r in reqs])
            result["served_auc_fp32"] = round(auc(torch.from_numpy(fp32), labels), 4)
            say(f"held-out AUC of the FP32 v2: {result['served_auc_fp32']}")
    finally:
        result["exit_code"] = gw.terminate()
    return result


async def _swap_under_load(address: str, pool: list[bytes], path: str, concurrency: int, seconds: float) -> dict:
    async def admin() -> list[str]:
        await asyncio.sleep(seconds / 3)

        def swap() -> list[str]:
            with GatewayClient(address) as c:
                c.load_model(path)
                c.set_default_version("dlrm", 2)
                c.unload_model("dlrm", 1)
                return [f"{m.name} v{m.version}" for m in c.list_models()]

        return await asyncio.to_thread(swap)

    load, models = await asyncio.gather(closed_loop(address, pool, concurrency, seconds, 1), admin())
    return {**load, "models": models}


def train_checkpoint(work: Path, steps: int) -> tuple[Path, Path]:
    """The tiny DLRM trained through two shard processes and checkpointed (standalone runs)."""
    from embedding_service.process import launch as launch_shard
    from protos import common_pb2
    from protos.plan import shard_config, simple_plan
    from trainer import checkpoint
    from trainer.train import ShardedTrainer

    config_path = ROOT / "configs" / "tiny.yaml"
    config = ModelConfig.load(config_path)
    plan = simple_plan(config, 2, kinds={"users": common_pb2.ROW_WISE, "items": common_pb2.COLUMN_WISE})
    shards = [launch_shard(shard_config(plan, s, seed=1), workdir=work / f"shard{s}") for s in range(2)]
    try:
        trainer = ShardedTrainer(config, plan, [s.address for s in shards], seed=1)
        for _ in trainer.train(SyntheticData(config, seed=1).batches(512, steps)):
            pass
        trainer.wait_updates()
        checkpoint.save(trainer, work / "ckpt", steps - 1, steps)
        trainer.close()
    finally:
        for s in shards:
            s.kill()
    return work / "ckpt", config_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps before export (standalone)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--workdir", help="default: a temporary directory")
    p.add_argument("--checkpoint", help="serve this job checkpoint instead of training one (needs --config)")
    p.add_argument("--config", help="the model YAML of --checkpoint")
    p.add_argument("--data-seed", type=int, default=1, help="synthetic data seed of --checkpoint's job")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="serving-demo-"))
    if bool(args.checkpoint) != bool(args.config):
        raise SystemExit("--checkpoint and --config go together")
    if args.checkpoint:
        ckpt, config_path = Path(args.checkpoint), Path(args.config)
    else:
        ckpt, config_path = train_checkpoint(work, args.steps)
    result = run_serving_demo(ckpt, None, config_path, work / "serving", seconds=args.seconds,
                              concurrency=args.concurrency, data_seed=args.data_seed, quiet=args.json)
    if args.json:
        print(json.dumps(result))
    ok = result["exit_code"] == 0 and not result["load"]["errors"] and not result["hot_swap"]["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
