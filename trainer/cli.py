"""`trainer`: train a DLRM against running shard services (torchrun-compatible for several trainers)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from protos.cli_errors import quiet_library_info, run_command
from protos.process import exit_now


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
    t.add_argument("--collective-timeout-s", type=float,
                   help="collective transport: no exchange waits longer for a shard or trainer (a frozen one); "
                        "it fails naming the step instead (default 300)")
    t.add_argument("--rpc-timeout-s", type=float, default=120.0,
                   help="deadline of every shard RPC: a shard that does not answer in time (partitioned, frozen) "
                        "fails the trainer with an error naming it. Keep it above the shards' wait_timeout_s "
                        "(sync mode: a lookup may wait that long for the other trainers). Default 120")
    t.add_argument("--tls-ca", help="PEM of the CA that signed the shards' and the coordinator's certificates (TLS)")
    t.add_argument("--tls-cert", help="PEM certificate this trainer presents (servers that require mutual TLS)")
    t.add_argument("--tls-key", help="PEM private key of --tls-cert")
    t.add_argument("--token-file", help="the shards' control-plane token, sent with Checkpoint / Restore "
                   "(default: env RECSYS_CONTROL_TOKEN)")
    t.add_argument("--strict", action="store_true", help="criteo: fail on the first malformed line")
    t.add_argument("--data-workers", type=int, default=0, help="criteo: parser processes")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=256, help="global batch size (split over trainers)")
    t.add_argument("--first-step", type=int, default=0, help="step number of the first step")
    t.add_argument("--seed", type=int, default=0, help="dense init and data seed")
    t.add_argument("--wire", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="embedding/gradient dtype on the wire")
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
    t.add_argument("--publish-dense", metavar="REDIS_URL", help="online freshness: publish the dense parameters "
                   "to Redis every --dense-every steps (the embedding rows come from shards started with "
                   "--publish-deltas); a gateway serving with --follow swaps its dense arch to them")
    t.add_argument("--dense-every", type=int, default=50, help="steps between dense publishes (default 50)")
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
    from protos.security import CONTROL_TOKEN_ENV, read_token
    from trainer.job import JobError, JobSettings, TrainerGroupError, TrainingJob

    settings = JobSettings(
        config=args.config, plan=args.plan, shards=args.shards.split(",") if args.shards else None,
        coordinator=args.coordinator, data=args.data, transport=args.transport, tls_ca=args.tls_ca,
        tls_cert=args.tls_cert, tls_key=args.tls_key, token=read_token(args.token_file, CONTROL_TOKEN_ENV),
        collective_timeout_s=args.collective_timeout_s, rpc_timeout_s=args.rpc_timeout_s,
        strict=args.strict, data_workers=args.data_workers, steps=args.steps, batch_size=args.batch_size,
        first_step=args.first_step, seed=args.seed, wire=args.wire, out=args.out, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, resume=args.resume, resume_if_present=args.resume_if_present,
        async_staleness=args.async_staleness,
        pipelined=not args.no_pipeline, logdir=args.logdir, eval_every=args.eval_every,
        publish_dense=args.publish_dense, dense_every=args.dense_every,
        eval_batches=args.eval_batches, json=args.json,
        rank=int(os.environ.get("RANK", "0")), world=int(os.environ.get("WORLD_SIZE", "1")))
    from protos.member_agent import Fenced
    from trainer.transport import CollectiveError, ShardCallFailed

    try:
        result = TrainingJob(settings).run()
    except (JobError, TrainerGroupError, CollectiveError, Fenced, ShardCallFailed) as e:
        raise SystemExit(str(e)) from None
    if settings.rank == 0:
        print(json.dumps({"event": "done", "steps": result.steps, "last_step": result.last_step, "loss": result.loss,
                          "samples_per_s": result.samples_per_s}), flush=True)
    if settings.world > 1 or settings.transport == "collective":
        # everything is written and the process group destroyed; gloo's threads can still abort the
        # interpreter's teardown (once in a full suite run, test_trainer_equivalence's collective case)
        exit_now(0)
    return 0


def evaluate_cmd(args: argparse.Namespace) -> int:
    from protos.model_config import ModelConfig
    from protos.plan import load_plan
    from trainer.data import HELDOUT, SyntheticData
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
    from protos.model_config import ModelConfig
    from protos.package import PackageError, load_package
    from protos.quantize import DenseQuantization
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
    from protos.model_config import ModelConfig
    from protos.plan import dump_plan, simple_plan

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
    from protos.plan import load_plan, shard_config

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
    print(f"rendezvous reachable: {args.host}:{args.port}"
          + (f" and coordinator {args.coordinator}" if args.coordinator else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_info()
    args = build_parser().parse_args(argv)
    commands = {"train": train, "evaluate": evaluate_cmd, "plan": plan_cmd, "shard-config": shard_config_cmd,
                "export": export_cmd, "wait-rendezvous": wait_rendezvous_cmd}
    return run_command(f"trainer {args.command}", commands[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
