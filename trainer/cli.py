"""`trainer`: train a DLRM against running shard services (torchrun-compatible for several trainers)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger("trainer")
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
    t.add_argument("--plan", help="sharding plan JSON (ShardingPlan); not with --coordinator")
    t.add_argument("--shards", help="comma-separated HOST:PORT of shard 0, 1, ...; not with --coordinator")
    t.add_argument("--coordinator", metavar="HOST:PORT",
                   help="take the plan and the shard addresses from the coordinator, register there, and follow "
                        "its rollouts (live re-sharding: fence at a step boundary, continue on the new plan)")
    t.add_argument("--data", default="synthetic",
                   help="synthetic (teacher DLRM, Zipf ids) or criteo:PATH[,PATH...] (Criteo TSV files)")
    t.add_argument("--transport", choices=["grpc", "collective"], default="grpc",
                   help="grpc: fan-out RPCs (across hosts); collective: all-to-all in one torch.distributed group "
                        "with the shards (started with collective_rank = WORLD_SIZE + shard id)")
    t.add_argument("--tls-ca", help="PEM of the CA that signed the shards' and the coordinator's certificates (TLS)")
    t.add_argument("--strict", action="store_true", help="criteo: fail on the first malformed line")
    t.add_argument("--data-workers", type=int, default=0, help="criteo: parser processes")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=256, help="global batch size (split over trainers)")
    t.add_argument("--first-step", type=int, default=0, help="step number of the first step")
    t.add_argument("--seed", type=int, default=0, help="dense init and data seed")
    t.add_argument("--wire", choices=list(WIRE), default="fp32", help="embedding/gradient dtype on the wire")
    t.add_argument("--out", help="directory for the final dense state (rank 0)")
    t.add_argument("--checkpoint-dir", help="consistent checkpoints (dense + every shard) go here")
    t.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (and on SIGTERM)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    t.add_argument("--resume-if-present", action="store_true",
                   help="--resume when --checkpoint-dir holds a complete checkpoint, else start fresh (a restarted "
                        "Kubernetes pod runs the same command as the first one)")
    t.add_argument("--async-staleness", type=int, default=0, metavar="K",
                   help="bounded-staleness training: lookups may run K steps ahead of this trainer's applied "
                        "updates (shards in async mode, staleness >= K); 0 is sync")
    t.add_argument("--no-pipeline", action="store_true", help="wait for each step's updates before the next lookup")
    t.add_argument("--logdir", help="TensorBoard logs (rank 0): loss, samples/s, held-out AUC and NE")
    t.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (and at the end)")
    t.add_argument("--eval-batches", type=int, default=4, help="held-out batches of --batch-size per evaluation")
    t.add_argument("--json", action="store_true", help="one JSON line per logged step instead of a progress bar")
    pl = sub.add_parser("plan", help="write a simple sharding plan (JSON) for a model config",
                        description="Table-wise round robin by default; --kind TABLE=row_wise|column_wise|"
                                    "table_row_wise|data_parallel changes one table. (The coordinator's planner "
                                    "balances by cost.)")
    pl.add_argument("--config", required=True)
    pl.add_argument("--shards", type=int, required=True, help="number of shards")
    pl.add_argument("--kind", action="append", default=[], help="TABLE=SHARDING_TYPE (repeatable)")
    pl.add_argument("--version", type=int, default=1)
    sc = sub.add_parser("shard-config", help="the config of one shard of a plan (JSON for `embedding-shard serve`)")
    sc.add_argument("--plan", required=True)
    sc.add_argument("--shard", type=int, required=True)
    sc.add_argument("--num-trainers", type=int, default=1)
    sc.add_argument("--mode", choices=["sync", "async"], default="sync")
    sc.add_argument("--staleness", type=int, default=0, help="async mode: steps a trainer's lookups may run ahead")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--collective", action="store_true",
                    help="join the trainers' group as rank num_trainers + shard (collective transport)")
    e = sub.add_parser("evaluate", help="held-out AUC / NE of a trained model (shards + a dense state file)",
                       description="Looks up the held-out synthetic batches through the shards (no updates) and "
                                   "scores them with the dense state; prints AUC, NE and the teacher's AUC.")
    e.add_argument("--config", required=True)
    e.add_argument("--plan", required=True)
    e.add_argument("--shards", required=True)
    e.add_argument("--dense", required=True, help="dense.pt from `train --out` (local.pt beside it is read too) "
                                                  "or a checkpoint's dense.pt")
    e.add_argument("--seed", type=int, default=0, help="the training data seed (the teacher)")
    e.add_argument("--batches", type=int, default=4)
    e.add_argument("--batch-size", type=int, default=2048)
    e.add_argument("--json", action="store_true")
    w = sub.add_parser("wait-rendezvous", help="wait for index 0's DNS name and port and for the coordinator",
                       description="Run before torchrun in a pod of an Indexed Job: rank > 0 waits until the "
                                   "master's name resolves AND its rendezvous port accepts a TCP connect (DNS of "
                                   "a headless Service resolves before the port listens); every rank waits for "
                                   "the coordinator's port. Exits 1 with the step it is stuck on at --timeout-s.")
    w.add_argument("--host", required=True, help="DNS name of index 0 (e.g. trainer-0.trainer)")
    w.add_argument("--port", type=int, required=True, help="index 0's rendezvous port (torchrun --master-port)")
    w.add_argument("--rank", type=int, default=int(os.environ.get("JOB_COMPLETION_INDEX", "0")),
                   help="this pod's node rank (default: env JOB_COMPLETION_INDEX, set by an Indexed Job)")
    w.add_argument("--coordinator", metavar="HOST:PORT", help="also wait until the coordinator accepts connections")
    w.add_argument("--timeout-s", type=float, default=600.0, help="give up after this long (exit 1)")
    x = sub.add_parser("export", help="a checkpoint -> a quantized, self-contained model package for the gateway",
                       description="Reassembles every table from the checkpoint's shard slices (and dense.pt's "
                                   "data-parallel tables), quantizes them row-wise (fbgemm), scripts the dense arch "
                                   "and writes a checksummed package directory for `inference-gateway serve`.")
    x.add_argument("--checkpoint", required=True, help="checkpoint root (uses LATEST) or one step-<s> directory")
    x.add_argument("--config", required=True, help="the model YAML the job trained")
    x.add_argument("--out", required=True, help="package directory to write (atomically)")
    x.add_argument("--quantize", default="fp32", help="table dtype for every table: fp32|fp16|int8|int4|int2")
    x.add_argument("--table-dtype", action="append", default=[], metavar="TABLE=DTYPE", help="one table's dtype")
    x.add_argument("--dense-quantize", choices=["none", "int8"], default="none",
                   help="int8: dynamic int8 quantization of the dense Linear layers")
    x.add_argument("--out-of-range", choices=["error", "zero"], default="error",
                   help="ids outside a table: INVALID_ARGUMENT (error) or a zero row (zero)")
    x.add_argument("--name", default="dlrm", help="model name the gateway serves it under")
    x.add_argument("--version", type=int, default=1, help="model version (>= 1)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.add_argument("--json", action="store_true")
    return p


def train(args: argparse.Namespace) -> int:
    from trainer import checkpoint
    from trainer.config import ModelConfig
    from trainer.data import SyntheticData
    from trainer.plan import load_plan
    from trainer.train import ShardedTrainer, init_distributed

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by WORLD_SIZE {world}")
    if args.data != "synthetic" and not args.data.startswith("criteo:"):
        raise SystemExit(f"--data {args.data!r}: expected synthetic or criteo:PATH[,PATH...]")
    if args.data != "synthetic" and args.eval_every:
        raise SystemExit("--eval-every: held-out evaluation needs --data synthetic (the teacher's held-out stream)")
    if (args.resume or args.resume_if_present) and not args.checkpoint_dir:
        raise SystemExit("--resume needs --checkpoint-dir")
    if args.resume_if_present:
        # LATEST is written last, so it names a complete checkpoint
        args.resume = args.resume or (Path(args.checkpoint_dir) / "LATEST").is_file()
    model_cfg = ModelConfig.load(args.config)
    follower = None
    if args.coordinator:
        if args.plan or args.shards:
            raise SystemExit("--coordinator gives the plan and the shards: drop --plan and --shards")
        if args.transport == "collective":
            raise SystemExit("--coordinator: live re-sharding needs --transport grpc")
        from trainer.coordination import PlanFollower

        follower = PlanFollower(args.coordinator, rank, tls_ca=args.tls_ca).start()
        plan, shards = follower.current_plan()
    elif not (args.plan and args.shards):
        raise SystemExit("give --plan and --shards, or --coordinator")
    else:
        plan, shards = load_plan(args.plan), args.shards.split(",")
    collective = args.transport == "collective"
    if args.async_staleness < 0:
        raise SystemExit("--async-staleness: must be >= 0")
    group = init_distributed(rank, world, plan.num_shards if collective else 0)
    trainer = ShardedTrainer(model_cfg, plan, shards, rank=rank, world_size=world, seed=args.seed,
                             wire_dtype=WIRE[args.wire], transport=args.transport, trainer_group=group,
                             tls_ca=args.tls_ca)
    data = SyntheticData(model_cfg, seed=args.seed)
    sizes = [args.batch_size // world] * world
    first_step, position = args.first_step, 0
    if args.resume:
        path = checkpoint.latest(args.checkpoint_dir)
        if rank == 0:
            resumed = checkpoint.restore(trainer, path)  # verifies, restores the shards and the dense state
        if world > 1:
            torch.distributed.barrier(group=group)
            if rank != 0:
                resumed = checkpoint.load_dense(trainer, path)
        first_step, position = resumed.step + 1, resumed.data_position
        log.info("resumed from %s at step %d (data position %d)", path, first_step, position)
    writer = None
    if args.logdir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.logdir)
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("requested", True))
    remaining = args.steps - (first_step - args.first_step)
    bar = tqdm(total=remaining, desc=f"trainer {rank}", unit="step", disable=args.json or rank != 0)
    start = time.perf_counter()
    loss, done = float("nan"), 0
    if args.data == "synthetic":
        source = data.batches(args.batch_size, remaining, start=position)
    else:
        from itertools import islice

        from trainer.criteo import CriteoReader

        reader = CriteoReader(args.data.removeprefix("criteo:").split(","), model_cfg, args.batch_size,
                              strict=args.strict, num_workers=args.data_workers, skip_batches=position)
        source = (b for b in islice(reader, remaining) if b.batch_size == args.batch_size)  # whole batches only
    local = (b.split(sizes)[rank] for b in source)
    for res in trainer.train(local, first_step=first_step, pipelined=not args.no_pipeline,
                             staleness=args.async_staleness):
        loss, done = res.loss, done + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if args.json and rank == 0:
            print(json.dumps({"step": res.step, "loss": loss}), flush=True)
        if writer is not None:
            writer.add_scalar("train/loss", loss, res.step)
            writer.add_scalar("train/samples_per_s", done * args.batch_size / (time.perf_counter() - start), res.step)
        if args.eval_every and done % args.eval_every == 0:
            _evaluate(trainer, data, args, res.step, writer, rank)
        if follower is not None:
            follower.step = res.step
        halt, fence = _agreed([stop["requested"], follower is not None and follower.fence_pending], world, group)
        periodic = args.checkpoint_every and (res.step + 1 - args.first_step) % args.checkpoint_every == 0
        if args.checkpoint_dir and (periodic or halt):
            _checkpoint(trainer, args.checkpoint_dir, res.step, position + done, rank, world, group)
        if halt:
            log.info("SIGTERM: stopped after step %d", res.step)
            break
        if fence:
            trainer.fence()
            resumed = follower.fence(res.step)
            if resumed.plan_version != trainer.router.plan.version:
                trainer.switch_plan(*follower.current_plan(resumed.plan_version))
                if args.checkpoint_dir:  # older checkpoints hold the old plan's slices: recovery needs a new one
                    _checkpoint(trainer, args.checkpoint_dir, res.step, position + done, rank, world, group)
            bar.set_description(f"trainer {rank} plan v{trainer.router.plan.version}")
    trainer.wait_updates()
    bar.close()
    if args.eval_every and done % args.eval_every:
        _evaluate(trainer, data, args, first_step + done - 1, writer, rank)
    if writer is not None:
        writer.close()
    elapsed = time.perf_counter() - start
    if rank == 0 and args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(trainer.model.state_dict(), out / "dense.pt")
        if trainer.local is not None:
            torch.save(trainer.local.state_dict(), out / "local.pt")
    if rank == 0:
        print(json.dumps({"event": "done", "steps": done, "last_step": first_step + done - 1, "loss": loss,
                          "samples_per_s": round(done * args.batch_size / max(elapsed, 1e-9), 1)}), flush=True)
    trainer.close()
    if follower is not None:
        follower.close()
    if torch.distributed.is_initialized():
        # an orderly teardown: a process group left to the interpreter's exit can abort in its destructor
        torch.distributed.barrier(group=group)
        torch.distributed.destroy_process_group()
    return 0


def _evaluate(trainer, data, args, step: int, writer, rank: int) -> None:
    from trainer.data import HELDOUT
    from trainer.train import evaluate

    trainer.wait_updates()
    metrics = evaluate(trainer, data.batches(args.batch_size, args.eval_batches, stream=HELDOUT))
    if rank == 0:
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"heldout/{k}", v, step)
        log.info("step %d held-out %s", step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if args.json:
            print(json.dumps({"step": step, "heldout": metrics}), flush=True)


def evaluate_cmd(args: argparse.Namespace) -> int:
    from trainer.config import ModelConfig
    from trainer.data import HELDOUT, SyntheticData
    from trainer.plan import load_plan
    from trainer.train import ShardedTrainer, evaluate

    model_cfg = ModelConfig.load(args.config)
    trainer = ShardedTrainer(model_cfg, load_plan(args.plan), args.shards.split(","))
    state = torch.load(args.dense)
    if "model" in state:  # a checkpoint's dense.pt: dense model and data-parallel tables
        trainer.replicated.load_state_dict(state["model"])
    else:  # `train --out`: dense.pt, and local.pt beside it when the plan has data-parallel tables
        trainer.model.load_state_dict(state)
        if trainer.local is not None:
            trainer.local.load_state_dict(torch.load(Path(args.dense).with_name("local.pt")))
    data = SyntheticData(model_cfg, seed=args.seed)
    metrics = evaluate(trainer, data.batches(args.batch_size, args.batches, stream=HELDOUT))
    metrics["teacher_auc"] = data.teacher_auc(args.batch_size * args.batches, args.batch_size)
    trainer.close()
    if args.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            print(f"{k:<12} {v:.4f}")
    return 0


def export_cmd(args: argparse.Namespace) -> int:
    from inference_gateway.package import PackageError, load_package
    from inference_gateway.quantize import DenseQuantization
    from trainer.config import ModelConfig
    from trainer.export import ExportError, export_package, read_checkpoint, table_dtypes

    try:
        config = ModelConfig.load(args.config)
        model = read_checkpoint(args.checkpoint, config)
        out = export_package(model, args.out, dtypes=table_dtypes(config, args.quantize, args.table_dtype),
                             name=args.name, version=args.version,
                             dense_quantization=DenseQuantization(args.dense_quantize),
                             out_of_range=args.out_of_range, overwrite=args.force,
                             source={"checkpoint": str(Path(args.checkpoint).resolve())})
        pkg = load_package(out)  # what the gateway will read: verified before we report success
    except (ExportError, PackageError, ValueError) as e:
        raise SystemExit(f"export: {e}") from None
    float_bytes = sum(t["float32_bytes"] for t in pkg.manifest["tables"])
    info = {"event": "exported", "out": str(out), "name": pkg.name, "version": pkg.version, "step": model.step,
            "table_bytes": pkg.table_bytes, "float32_table_bytes": float_bytes,
            "ratio": round(pkg.table_bytes / float_bytes, 4)}
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:<20} {v}")
    return 0


def plan_cmd(args: argparse.Namespace) -> int:
    from protos import common_pb2
    from trainer.config import ModelConfig
    from trainer.plan import dump_plan, simple_plan

    kinds = {}
    for spec in args.kind:
        table, _, kind = spec.partition("=")
        try:
            kinds[table] = common_pb2.ShardingType.Value(kind.upper())
        except ValueError:
            raise SystemExit(f"--kind {spec!r}: expected TABLE=table_wise|row_wise|column_wise|table_row_wise|"
                             "data_parallel") from None
    print(dump_plan(simple_plan(ModelConfig.load(args.config), args.shards, args.version, kinds)))
    return 0


def shard_config_cmd(args: argparse.Namespace) -> int:
    from trainer.plan import load_plan, shard_config

    plan = load_plan(args.plan)
    if not 0 <= args.shard < plan.num_shards:
        raise SystemExit(f"--shard {args.shard}: the plan has shards 0..{plan.num_shards - 1}")
    print(json.dumps(shard_config(plan, args.shard, num_trainers=args.num_trainers, mode=args.mode, seed=args.seed,
                                  collective=args.collective,
                                  **({"staleness": args.staleness} if args.staleness else {})), indent=1))
    return 0


def wait_rendezvous_cmd(args: argparse.Namespace) -> int:
    from trainer.rendezvous import Endpoint, RendezvousTimeout, parse_endpoint, wait_rendezvous

    try:
        coordinator = parse_endpoint(args.coordinator) if args.coordinator else None
        wait_rendezvous(Endpoint(args.host, args.port), args.rank, coordinator, args.timeout_s)
    except (ValueError, RendezvousTimeout) as e:
        print(f"trainer wait-rendezvous: {e}", file=sys.stderr)
        return 1
    log.info("rendezvous reachable: %s:%d%s", args.host, args.port,
             f" and coordinator {args.coordinator}" if args.coordinator else "")
    return 0


def _checkpoint(trainer, root: str, step: int, data_position: int, rank: int, world: int, group) -> None:
    """A consistent cut at a step boundary: every trainer's update of `step` applied, then rank 0 saves."""
    from trainer import checkpoint

    trainer.wait_updates()  # sync mode: every trainer's update of this step is applied
    if world > 1:
        torch.distributed.barrier(group=group)
    if rank == 0:
        saved = checkpoint.save(trainer, root, step, data_position)
        log.info("checkpoint of step %d: %s", step, saved)
    if world > 1:
        torch.distributed.barrier(group=group)


def _agreed(flags: list[bool], world: int, group=None) -> list[bool]:
    """Each flag true on every rank once any rank saw it, so all stop at the same step boundary."""
    if world == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([int(f) for f in flags])
    torch.distributed.all_reduce(t, group=group)
    return [bool(x) for x in t.tolist()]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    commands = {"train": train, "evaluate": evaluate_cmd, "plan": plan_cmd, "shard-config": shard_config_cmd,
                "export": export_cmd, "wait-rendezvous": wait_rendezvous_cmd}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
