"""The serving part of the demo: export a training checkpoint, serve it, drive load, print QPS and latency.

    python -m deploy.local.demo_serving [--steps 300] [--seconds 3] [--frontend serve-native] [--json]

Standalone it first trains the tiny DLRM through two shard processes and checkpoints it (or serves
`--checkpoint DIR --config YAML`); the main demo calls `run_serving_demo` with its own checkpoint.
Exports the checkpoint at INT8 (and FP32 for comparison) and serves the INT8 package with
`inference-gateway serve-native` (the native frontend, on nghttp2, over Python workers, Predict and the Open
Inference Protocol on one port, management on its own; `--frontend serve-triton`: tritonserver's
frontend, Predict through its --predict-port proxy; `--frontend serve`: the pure-Python gateway, whose
one port serves all three roles). It checks the held-out AUC through the project's Predict and through
the Open Inference Protocol (KServe v2 ModelInfer), measures one-sample requests on both, and hot-swaps
to a second version under load through the management port (load v2 as the default, unload v1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from inference_gateway import oip
from inference_gateway.client import GatewayClient, build_request, scores_of
from inference_gateway.loadgen import OIP_METHOD, closed_loop
from inference_gateway.process import GatewayProcess, launch, launch_native, launch_triton
from protos.model_config import ModelConfig
from trainer.data import HELDOUT, SyntheticData, auc
from trainer.export import export_package, read_checkpoint, table_dtypes

ROOT = Path(__file__).resolve().parent.parent.parent
FRONTENDS = ("serve-native", "serve-triton", "serve")
CHUNK = 256  # samples per AUC request: serve-triton's --max-batch-size (a larger request is refused)


@dataclass(frozen=True)
class Endpoints:
    """Where each role is served: serve-triton has three ports, serve-native two, serve one."""

    predict: str  # recsys.v1 Predict / PredictStream / ListModels
    oip: str  # KServe v2 ModelInfer
    management: str  # LoadModel / UnloadModel / SetDefaultVersion


def start_gateway(frontend: str, package: Path, store: Path, workdir: Path) -> tuple[GatewayProcess, Endpoints]:
    common = ["--model", str(package), "--max-wait-ms", "1", "--model-store", str(store)]
    if frontend == "serve":
        gw = launch(common, workdir=workdir)
        return gw, Endpoints(gw.address, gw.address, gw.address)
    local = "127.0.0.1:{}"
    if frontend == "serve-native":
        gw = launch_native([*common, "--workers", "2", "--metrics-port", "-1", "--grace-s", "3"], workdir=workdir)
        return gw, Endpoints(gw.address, gw.address, local.format(gw.announced["management_port"]))
    # two workers, one per core; no queue bound (a bound costs Triton's batch prefetch: --max-queue's help)
    gw = launch_triton([*common, "--workers", "2", "--metrics-port", "-1", "--grace-s", "3"], workdir=workdir)
    return gw, Endpoints(local.format(gw.announced["predict_port"]), gw.address,
                         local.format(gw.announced["management_port"]))


def _attempt(result: dict, key: str, say: Callable[[str], None], fn: Callable[[], float]) -> None:
    """One measured figure; a refusal is recorded (and shown) instead of stopping the demo."""
    try:
        result[key] = fn()
    except grpc.RpcError as e:
        result[key] = None
        result.setdefault("failures", {})[key] = f"{e.code().name}: {(e.details() or '')[:300]}"
        say(f"{key}: FAILED {result['failures'][key]}")


def run_serving_demo(checkpoint_dir: Path, plan_path: Path | None, config_path: Path, workdir: Path, *,
                     seconds: float = 3.0, concurrency: int = 32, data_seed: int = 1, quiet: bool = False,
                     frontend: str = "serve-native") -> dict:
    """Exports `checkpoint_dir` (FP32 and INT8), serves the INT8 package, and returns what it measured.

    `plan_path` is not needed (the checkpoint's shards record their slices) and is accepted for callers
    that have one. `data_seed` is the synthetic data seed the job trained on (for the held-out AUC).
    """
    del plan_path
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.load(config_path)
    features = [f.name for f in config.features]
    say = (lambda *_: None) if quiet else (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    model = read_checkpoint(checkpoint_dir, config)
    pkgs = {q: export_package(model, workdir / f"model-{q}.pkg", dtypes=table_dtypes(config, q, []), version=v,
                              overwrite=True, source={"checkpoint": str(checkpoint_dir)})
            for v, q in ((1, "int8"), (2, "fp32"))}
    say(f"exported step {model.step} to {', '.join(str(p) for p in pkgs.values())} in "
        f"{time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    gw, at = start_gateway(frontend, pkgs["int8"], workdir, workdir / "gateway")
    result: dict = {"frontend": frontend, "address": at.predict, "oip_address": at.oip,
                    "management_address": at.management, "step": model.step,
                    "start_s": round(time.perf_counter() - t0, 1)}
    say(f"{frontend}: Predict on {at.predict}, Open Inference Protocol on {at.oip}, management on "
        f"{at.management} (up in {result['start_s']}s)")
    try:
        with GatewayClient(at.predict) as client, grpc.insecure_channel(at.oip) as oip_channel:
            infer = oip.oip_grpc.GRPCInferenceServiceStub(oip_channel).ModelInfer
            data = SyntheticData(config, seed=data_seed)
            heldout = [c for b in data.batches(1024, 4, stream=HELDOUT) for c in b.split([CHUNK] * (1024 // CHUNK))]
            labels = torch.cat([b.labels for b in heldout])
            arrays = [(b.dense.numpy(), b.sparse.lengths.numpy(), b.sparse.values.numpy()) for b in heldout]

            def predict_auc() -> float:
                served = np.concatenate([scores_of(client.predict_request(build_request(*a), timeout=60))
                                         for a in arrays])
                return round(auc(torch.from_numpy(served), labels), 4)

            def oip_auc() -> float:
                served = np.concatenate([oip.decode_scores(infer(oip.infer_request(*a, features, model="dlrm"),
                                                                 timeout=60), a[0].shape[0]) for a in arrays])
                return round(auc(torch.from_numpy(served), labels), 4)

            _attempt(result, "served_auc_int8", say, predict_auc)
            _attempt(result, "served_auc_int8_oip", say, oip_auc)
            say(f"held-out AUC of the served INT8 model: {result['served_auc_int8']} through Predict, "
                f"{result['served_auc_int8_oip']} through the Open Inference Protocol")
            first = heldout[0]
            parts = first.sparse.split([1] * 64 + [first.dense.shape[0] - 64])[:64]
            singles = [(first.dense[i : i + 1].numpy(), s.lengths.numpy(), s.values.numpy())
                       for i, s in enumerate(parts)]
            one = [build_request(*a).SerializeToString() for a in singles]
            one_oip = [oip.infer_request(*a, features, model="dlrm").SerializeToString() for a in singles]
            for key, address, pool, method, what in (("load_oip", at.oip, one_oip, OIP_METHOD, "ModelInfer"),
                                                      ("load", at.predict, one, None, "Predict")):
                kwargs = {"method": method} if method else {}
                load = asyncio.run(closed_loop(address, pool, concurrency, seconds, 1, **kwargs))
                result[key] = {"concurrency": concurrency, **load}
                say(f"{what}, one sample per request, {concurrency} concurrent clients: {load['requests_per_s']:.0f} "
                    f"requests/s, p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, errors {load['errors'] or 0}")
            # hot swap: version 2 (FP32) replaces version 1 while requests keep flowing on both protocols
            swap = asyncio.run(_swap_under_load(at, one, one_oip, str(pkgs["fp32"]), concurrency, seconds))
            result["hot_swap"] = swap
            say(f"hot swap to v2 under load (load {swap.get('load_s')} s, unload {swap.get('unload_s')} s): "
                f"{swap['ok']} requests, errors {swap['errors'] or 0}; now serving {swap['models']}")
            _attempt(result, "served_auc_fp32", say, predict_auc)
            say(f"held-out AUC of the FP32 v2: {result['served_auc_fp32']}")
    finally:
        t0 = time.perf_counter()
        result["exit_code"] = gw.terminate(timeout=120)
        result["stop_s"] = round(time.perf_counter() - t0, 1)
    return result


async def _swap_under_load(at: Endpoints, pool: list[bytes], oip_pool: list[bytes], path: str, concurrency: int,
                           seconds: float) -> dict:
    timing: dict[str, float] = {}
    done = False  # the load lasts `seconds` and at least until the swap is over

    async def admin() -> list[str]:
        nonlocal done
        await asyncio.sleep(seconds / 3)

        def swap() -> list[str]:
            with GatewayClient(at.management) as c:
                t0 = time.perf_counter()
                c.load_model(path, make_default=True)  # serve-triton: the highest version is the default
                timing["load_s"] = round(time.perf_counter() - t0, 1)
                c.set_default_version("dlrm", 2)  # already so: changes nothing
                t0 = time.perf_counter()
                c.unload_model("dlrm", 1)
                timing["unload_s"] = round(time.perf_counter() - t0, 1)
                return [f"{m.name} v{m.version}" for m in c.list_models()]

        try:
            return await asyncio.to_thread(swap)
        finally:
            done = True

    half = max(1, concurrency // 2)
    predict, infer, models = await asyncio.gather(
        closed_loop(at.predict, pool, half, seconds, 1, until=lambda: done),
        closed_loop(at.oip, oip_pool, half, seconds, 1, method=OIP_METHOD, until=lambda: done), admin())
    errors: dict[str, int] = {}
    for name, r in (("Predict", predict), ("ModelInfer", infer)):
        for code, n in r["errors"].items():
            errors[f"{name}:{code}"] = n
    return {"ok": predict["ok"] + infer["ok"], "errors": errors, "predict": predict, "oip": infer,
            "models": models, **timing}


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
    p.add_argument("--frontend", choices=FRONTENDS, default="serve-native",
                   help="serve-native (default), serve-triton or the pure-Python serve")
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
                              concurrency=args.concurrency, data_seed=args.data_seed, quiet=args.json,
                              frontend=args.frontend)
    if args.json:
        print(json.dumps(result))
    return 0 if served_ok(result) else 1


def served_ok(result: dict) -> bool:
    """Every serving figure was measured without an error and the gateway exited 0."""
    measured = [result.get(k) for k in ("load", "load_oip", "hot_swap")]
    return (result.get("exit_code") == 0 and not result.get("failures")
            and all(m is not None and not m["errors"] for m in measured))


if __name__ == "__main__":
    sys.exit(main())
