"""Online freshness at full training speed: the Criteo-Kaggle config trained by one trainer through two shard
processes, with and without delta publishing, while a gateway serves W1 load (and, with deltas, follows them).

Per round, both variants (medians over rounds):
  off  shards without --publish-deltas; a gateway serving the base package, not following
  on   shards publishing to a real Redis; a gateway following (serve --follow)
`--frontend serve-triton`: the gateway is `serve-triton` (2 workers, its W1 load as ModelInfer on the OIP
port), following through its follower process (the lag from the follower's /metrics).
and for each: training samples/s, the gateway's W1 requests/s under closed-loop load at the same time; for
`on`: the lag from a step applied on the shard to its rows served (p50 / p99, from the gateway's
delta_lag_seconds histogram), delta bytes/s, and the rows applied.

Targets: publishing costs <= 5 % of training samples/s; lag p99 <= 2 s; the gateway serves >= 0.9 x its
requests/s without deltas.

    python -m benchmarks.freshness --rounds 3 --seconds 20 [--frontend serve-triton]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def scrape(port: int) -> dict[str, float]:
    """Prometheus samples by full name with labels (`name{label="v"}`)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def lag_quantiles(before: dict[str, float], after: dict[str, float], qs=(0.5, 0.99)) -> dict[str, float | None]:
    """Quantiles of delta_lag_seconds over every table between two scrapes (bucket upper bounds)."""
    buckets: dict[float, float] = {}
    for key, v in after.items():
        if key.startswith("delta_lag_seconds_bucket") and 'table="dense"' not in key:
            le = key.split('le="')[1].split('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + v - before.get(key, 0.0)
    total = buckets.get(float("inf"), 0.0)
    out: dict[str, float | None] = {}
    for q in qs:
        hit = next((b for b in sorted(buckets) if total and buckets[b] >= q * total), None)
        out[f"lag_p{round(q * 100)}_s"] = hit
    out["lag_samples"] = total
    return out


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def timed_feed(batches: list, until: float):
    """Batches until `until` (perf_counter); the training loop then finishes every step it began."""
    i = 0
    while time.perf_counter() < until:
        yield batches[i % len(batches)]
        i += 1


LOAD = """
import asyncio, json, sys
from benchmarks.gateway_load import infer_pool, request_pool
from inference_gateway.loadgen import METHOD, OIP_METHOD, closed_loop
from protos.model_config import ModelConfig
cfg = ModelConfig.load(sys.argv[2])
model = sys.argv[5]  # "": serve's Predict; else ModelInfer of that model (serve-triton)
pool = infer_pool(cfg, 1, 512, model) if model else request_pool(cfg, 1, 512)
method = OIP_METHOD if model else METHOD
print(json.dumps(asyncio.run(closed_loop(sys.argv[1], pool, int(sys.argv[3]), float(sys.argv[4]), 1, method))))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "criteo_kaggle.yaml"))
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=20.0, help="training (and load) per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16, help="W1 closed-loop load on the gateway meanwhile")
    p.add_argument("--interval-ms", type=float, default=100.0, help="delta coalescing interval")
    p.add_argument("--delta-dtype", default="fp16", choices=["fp32", "fp16"])
    p.add_argument("--quantize", default="int8", help="the gateway's table dtype")
    p.add_argument("--frontend", default="serve", choices=["serve", "serve-triton"])
    args = p.parse_args(argv)

    from coordinator.redis_backend import EmbeddedRedis
    from embedding_service.allocator import tune_allocator
    from embedding_service.process import launch as launch_shard
    from inference_gateway.process import launch as launch_gateway
    from inference_gateway.process import launch_triton
    from protos.model_config import ModelConfig
    from protos.plan import shard_config, simple_plan
    from protos.table_init import initial_rows
    from trainer.data import SyntheticData
    from trainer.export import ExportedModel, export_package, table_dtypes
    from trainer.model import DenseDLRM
    from trainer.train import ShardedTrainer

    tune_allocator()
    cfg = ModelConfig.load(args.config)
    cfg.dense_lr = 0.001
    plan = simple_plan(cfg, 2)
    work = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    redis = EmbeddedRedis(work / "redis", persist=False)
    base = work / "base.pkg"
    tables = {t.name: initial_rows(t, 0, 0, t.num_rows, 0, t.dim) for t in cfg.tables}
    export_package(ExportedModel(cfg, DenseDLRM(cfg, seed=0), tables, step=-1), base,
                   dtypes=table_dtypes(cfg, args.quantize, []))
    del tables
    publish = {"redis_url": redis.url, "interval_s": args.interval_ms / 1000, "dtype": args.delta_dtype}
    procs = []
    variants = {}
    for name in ("off", "on"):
        shards = [launch_shard({**shard_config(plan, s), **({"publish_deltas": publish} if name == "on" else {})},
                               workdir=work / f"{name}-shard{s}", env=dict(os.environ)) for s in range(2)]
        follow = ["--follow", redis.url] if name == "on" else []
        if args.frontend == "serve":
            gw = launch_gateway(["--model", str(base), *follow], workdir=work / f"{name}-gw")
        else:
            gw = launch_triton(["--model", str(base), "--workers", "2", *follow], workdir=work / f"{name}-gw")
        procs += [*shards, gw]
        variants[name] = (shards, gw, ShardedTrainer(cfg, plan, [s.address for s in shards]))
    model = json.loads((base / "manifest.json").read_text())["name"] if args.frontend == "serve-triton" else ""

    def lag_port(gw) -> int:  # where delta_lag_seconds is: the gateway, or serve-triton's follower
        return gw.announced.get("follower_metrics_port") or gw.metrics_port

    data = SyntheticData(cfg, seed=1, pooling_factor=1)
    batches = list(data.batches(args.batch, 8))
    results: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    step = {"off": 0, "on": 0}
    try:
        for rnd in range(args.rounds):
            for name, (shards, gw, trainer) in variants.items():
                before = {s.metrics_port: scrape(s.metrics_port) for s in shards}
                gw_before = scrape(lag_port(gw))
                load = subprocess.Popen([sys.executable, "-c", LOAD, gw.address, args.config, str(args.concurrency),
                                         str(args.seconds), model], stdout=subprocess.PIPE, cwd=ROOT, text=True)
                time.sleep(1.5)  # the load generator's start-up and warm-up
                t0, n = time.perf_counter(), 0

                for _ in trainer.train(timed_feed(batches, t0 + args.seconds), first_step=step[name]):
                    n += 1
                trainer.wait_updates()
                elapsed = time.perf_counter() - t0
                step[name] += n
                out, _ = load.communicate(timeout=args.seconds + 120)
                served = json.loads(out.strip().splitlines()[-1])
                time.sleep(1.0 + args.interval_ms / 1000)  # the last entries are applied
                r = results[name]
                r.setdefault("train_samples_per_s", []).append(n * args.batch / elapsed)
                r.setdefault("gateway_requests_per_s", []).append(served["requests_per_s"])
                if name == "on":
                    gw_after = scrape(lag_port(gw))
                    sent = sum(total(scrape(s.metrics_port), "delta_bytes_total") - total(before[s.metrics_port],
                               "delta_bytes_total") for s in shards)
                    dropped = sum(total(scrape(s.metrics_port), "delta_dropped_rows_total") for s in shards)
                    lag = lag_quantiles(gw_before, gw_after)
                    r.setdefault("lag_p50_s", []).append(lag["lag_p50_s"] or float("nan"))
                    r.setdefault("lag_p99_s", []).append(lag["lag_p99_s"] or float("nan"))
                    r.setdefault("delta_bytes_per_s", []).append(sent / elapsed)
                    r.setdefault("rows_applied", []).append(
                        total(gw_after, "delta_rows_applied_total") - total(gw_before, "delta_rows_applied_total"))
                    r.setdefault("dropped_rows_total", []).append(dropped)
                emit({"bench": "freshness", "round": rnd, "variant": name, "steps": n, "seconds": round(elapsed, 2),
                      **{k: round(v[-1], 3) for k, v in r.items()}})
        med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
        off, on = med["off"], med["on"]
        emit({"bench": "freshness", "summary": True, "frontend": args.frontend, "rounds": args.rounds,
              "batch": args.batch,
              "delta_dtype": args.delta_dtype, "interval_ms": args.interval_ms,
              "train_samples_per_s": {"off": round(off["train_samples_per_s"]), "on": round(on["train_samples_per_s"])},
              "publish_cost": round(1 - on["train_samples_per_s"] / off["train_samples_per_s"], 3),
              "publish_cost_target": 0.05,
              "lag_p50_s": on["lag_p50_s"], "lag_p99_s": on["lag_p99_s"], "lag_p99_target_s": 2.0,
              "delta_mb_per_s": round(on["delta_bytes_per_s"] / 1e6, 2),
              "gateway_requests_per_s": {"off": round(off["gateway_requests_per_s"]),
                                         "on": round(on["gateway_requests_per_s"])},
              "gateway_ratio": round(on["gateway_requests_per_s"] / off["gateway_requests_per_s"], 3),
              "gateway_ratio_target": 0.9, "dropped_rows": on["dropped_rows_total"]})
    finally:
        for _, _, trainer in variants.values():
            trainer.close()
        for proc in procs:
            proc.terminate()
        redis.close()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
