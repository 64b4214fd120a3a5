"""The trainer's per-step cost of distributing inputs and outputs, against the number of features and shards.

For each (features, shards) point: a model of F tables (one feature each, dim `--dim`, rows log-uniform from
10^3 to 10^6), every 10th table table-row-wise over 4 shards and the rest table-wise round robin; a
Criteo-like batch (most features one id per sample, every 8th multi-hot up to 20). Timed per step, as the
trainer does it (trainer/train.py), without the network:

- input_dist: `Router.input_dist` (ids to per-shard requests) + encoding every shard's Lookup
  (`ShardClient._lookup_bytes`, what `GrpcTransport.lookup_async` sends);
- output_dist: `Router.output_dist` over every shard's [B, sum(dims)] response;
- grad_dist: `Router.grad_dist` + encoding every shard's Update (`ShardClient._update_bytes`);
- dense: the dense DLRM step (`DenseDLRM` forward, BCE, backward, SGD) on the same batch.

`dist_over_dense` = (input + output + grad distribution) / dense. Target: <= 0.10 at 1,000 features over
64 shards. JSON lines, one per point.

    python -m benchmarks.router_scale [--features 26 100 1000] [--shards 8 64] [--batch 2048] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from protos import common_pb2
from protos.model_config import ModelConfig
from protos.plan import simple_plan
from protos.shard_client import ShardClient
from trainer.model import DenseDLRM
from trainer.router import Router


def model_of(features: int, dim: int, seed: int = 0) -> ModelConfig:
    rng = random.Random(seed)
    opt = common_pb2.OptimizerConfig(type=common_pb2.EXACT_ROWWISE_ADAGRAD, learning_rate=0.05)
    tables = [common_pb2.TableConfig(name=f"t{i}", num_rows=int(10 ** rng.uniform(3, 6)), dim=dim,
                                     features=[f"f{i}"], optimizer=opt) for i in range(features)]
    return ModelConfig(tables=tables, bottom_mlp=[512, 256, dim])


def plan_of(model: ModelConfig, shards: int) -> common_pb2.ShardingPlan:
    kinds = {t.name: common_pb2.TABLE_ROW_WISE for i, t in enumerate(model.tables) if i % 10 == 0}
    return simple_plan(model, shards, kinds=kinds, row_shards=min(4, shards))


def batch_of(model: ModelConfig, batch: int, seed: int = 0) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for i, f in enumerate(model.features):
        ls = torch.randint(0, 21, (batch,), generator=g) if i % 8 == 7 else torch.ones(batch, dtype=torch.int64)
        lengths.append(ls)
        values.append(torch.randint(0, f.num_rows, (int(ls.sum()),), generator=g))
    return [f.name for f in model.features], torch.cat(lengths), torch.cat(values)


def _time(fn, steps: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_point(features: int, shards: int, batch: int, dim: int, steps: int) -> dict:
    model = model_of(features, dim)
    plan = plan_of(model, shards)
    router = Router(plan, model)
    keys, lengths, values = batch_of(model, batch)
    clients = [ShardClient(f"127.0.0.1:{1 + s}", plan_version=plan.version) for s in range(shards)]  # never dialed

    def input_dist():
        reqs = router.input_dist(keys, lengths, values)
        for s, r in reqs.items():
            clients[s]._lookup_bytes(r.features, batch, r.lengths, r.values, r.weights, trainer_id=0, step=0)
        return reqs

    t_in, reqs = _time(input_dist, steps)
    responses = {s: torch.randn(batch, sum(r.dims)) for s, r in reqs.items()}
    t_out, emb = _time(lambda: router.output_dist(responses), steps)

    def grad_dist():
        grads = router.grad_dist(emb)
        for s, g in grads.items():
            clients[s]._update_bytes("h", g, torch.float32, None)
        return grads

    t_grad, _ = _time(grad_dist, steps)
    dense_model = DenseDLRM(model)
    opt = torch.optim.SGD(dense_model.parameters(), lr=0.1)
    dense, labels = torch.randn(batch, model.dense_features), torch.randint(0, 2, (batch,)).float()

    def dense_step():
        e = emb.detach().requires_grad_()
        loss = F.binary_cross_entropy_with_logits(dense_model(dense, e), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_dense, _ = _time(dense_step, 1 if features >= 500 else steps)  # tens of seconds at 1,000 features
    for c in clients:
        c.close()
    dist = t_in + t_out + t_grad
    return {"benchmark": "router_scale", "features": features, "shards": shards, "batch": batch, "dim": dim,
            "ids_per_step": values.numel(), "routes": sum(len(r) for r in router.shard_routes.values()),
            "input_dist_ms": round(t_in * 1e3, 2), "output_dist_ms": round(t_out * 1e3, 2),
            "grad_dist_ms": round(t_grad * 1e3, 2), "dense_step_ms": round(t_dense * 1e3, 2),
            "dist_over_dense": round(dist / t_dense, 4), "target": 0.10, "target_met": dist / t_dense <= 0.10,
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, nargs="+", default=[26, 100, 1000])
    ap.add_argument("--shards", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--batch", type=int, default=2048, help="samples per step (one trainer)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed repetitions per phase (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared host)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    points = [(f, s) for f in args.features for s in args.shards]
    for f, s in tqdm(points, desc="points", file=sys.stderr):
        print(json.dumps(run_point(f, s, args.batch, args.dim, args.steps)), flush=True)


if __name__ == "__main__":
    main()
