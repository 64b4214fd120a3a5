"""Shard service throughput against in-process fbgemm TBE, on the Criteo-Kaggle workload.

Prints one JSON line per result. Compares, in one run and interleaved round by round:
  in_process  - fbgemm SplitTableBatchedEmbeddingBagsCodegen forward+backward in this process (the limit)
  grpc_1      - one client against a shard process on loopback (lookup, then update, per step)
  grpc_2sync  - two client processes in sync mode, half the batch each, one merged update per step
for each pooling factor and wire dtype (fp32 exact, fp16). Also the shard's resident memory against
its weights + optimizer state, and lookup latency percentiles.

    python -m benchmarks.shard_throughput --pooling 1 20 --wire fp32 fp16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time

import torch

from trainer import criteo_kaggle as criteo

WIRE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def in_process_rate(table_defs, batches, grads, steps: int) -> float:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    global _TBE
    if _TBE is None:
        _TBE = SplitTableBatchedEmbeddingBagsCodegen(
            [(t["num_rows"], t["dim"], EmbeddingLocation.HOST, ComputeDevice.CPU) for t in table_defs],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01)
    b = batches[0][0].numel() // len(table_defs)
    torch.set_num_threads(CORES)  # the in-process limit gets every core
    start = time.perf_counter()
    for i in range(steps):
        lengths, values = batches[i % len(batches)]
        out = _TBE(values, torch.ops.fbgemm.asynchronous_complete_cumsum(lengths))
        out.backward(grads[i % len(grads)])
    return steps * b / (time.perf_counter() - start)


_TBE = None
CORES = torch.get_num_threads()


def client_loop(address: str, trainer: int, batch_size: int, pooling: int, steps: int, wire: str,
                pipelined: bool, first_step: int, id_dtype: torch.dtype, warmup: int = 5) -> tuple[float, list[float]]:
    """Runs `warmup` + `steps` lookup/update steps; returns (samples/s, lookup latencies in seconds)
    over the last `steps`."""
    from protos.shard_client import ShardClient

    table_defs = criteo.tables()
    gen = torch.Generator().manual_seed(100 + trainer)
    batches = [criteo.batch(gen, batch_size, pooling, table_defs, id_dtype) for _ in range(4)]
    grad = torch.randn(batch_size, 64 * len(table_defs), generator=gen) * 1e-3
    feats = criteo.features()
    dtype = WIRE[wire]
    lat: list[float] = []
    # The client only encodes and converts; one intra-op thread keeps its idle OpenMP threads from
    # spinning on the cores the shard needs.
    torch.set_num_threads(1)
    with ShardClient(address) as client:
        client.wait_ready()

        def lookup(step: int):
            lengths, values = batches[step % len(batches)]
            return client.lookup_async(feats, batch_size, lengths, values, trainer_id=trainer, step=step,
                                       wire_dtype=dtype)

        end_step = first_step + warmup + steps
        start = time.perf_counter()
        t0 = time.perf_counter()
        pending = lookup(first_step)
        for s in range(first_step, end_step):
            if s == first_step + warmup:
                start = time.perf_counter()
                lat.clear()
            res = pending.result()
            lat.append(time.perf_counter() - t0)
            upd = client.update_async(res.handle, grad, wire_dtype=dtype)
            if pipelined and s + 1 < end_step:
                # the request for step s+1 travels while step s's update is applied; the shard
                # serves it only after that update (sync ordering), so results do not change
                t0 = time.perf_counter()
                pending = lookup(s + 1)
                upd.result()
            else:
                upd.result()
                if s + 1 < end_step:
                    t0 = time.perf_counter()
                    pending = lookup(s + 1)
        elapsed = time.perf_counter() - start
    return steps * batch_size / elapsed, lat


def _worker(args, queue) -> None:
    from embedding_service.allocator import tune_allocator

    tune_allocator()
    queue.put(client_loop(*args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    p.add_argument("--wire", nargs="+", default=["fp32", "fp16"], choices=list(WIRE))
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (after 5 warm-up steps)")
    p.add_argument("--rounds", type=int, default=3, help="repetitions; medians are reported")
    p.add_argument("--row-cap", type=int, default=criteo.ROW_CAP)
    p.add_argument("--no-pipeline", action="store_true", help="one request in flight per client")
    p.add_argument("--int64-ids", action="store_true", help="send ids as int64 (default int32: every table fits)")
    p.add_argument("--skip-2sync", action="store_true")
    p.add_argument("--compute-threads", type=int, default=None, help="shard TBE threads (default: cores - 1)")
    args = p.parse_args(argv)

    from embedding_service.allocator import tune_allocator
    from protos.shard_client import ShardClient

    tune_allocator()  # the in-process baseline and the client get the same allocator settings as the shard
    from embedding_service.process import launch

    table_defs = criteo.tables(cap=args.row_cap)
    id_dtype = torch.int64 if args.int64_ids else torch.int32
    work = tempfile.mkdtemp(prefix="bench-shard-")
    common = {"tables": table_defs, "mode": "sync", "compute_threads": args.compute_threads}
    shards = {"grpc_1": launch({**common, "num_trainers": 1}, workdir=f"{work}/one")}
    if not args.skip_2sync:
        shards["grpc_2sync"] = launch({**common, "num_trainers": 2}, workdir=f"{work}/two")
    ctx = mp.get_context("spawn")
    step_counter = {name: 0 for name in shards}
    # the fixed cost of a shard process (interpreter, torch, fbgemm, gRPC) with a one-row table
    empty = launch({"tables": criteo.tables(cap=1)[:1]}, workdir=f"{work}/empty")
    with ShardClient(empty.address) as c:
        baseline = c.info().resident_bytes
    empty.terminate()

    def memory(record: str, name: str, info) -> None:
        model = info.weight_bytes + info.optimizer_bytes
        emit({"bench": record, "shard": name, "weight_bytes": info.weight_bytes,
              "optimizer_bytes": info.optimizer_bytes, "resident_bytes": info.resident_bytes,
              "empty_shard_resident_bytes": baseline, "ratio": round(info.resident_bytes / model, 4),
              "ratio_above_empty_shard": round((info.resident_bytes - baseline) / model, 4), "target": 1.15})

    try:
        for name, proc in shards.items():
            with ShardClient(proc.address) as c:
                memory("shard_memory", name, c.info())
        for pooling in args.pooling:
            gen = torch.Generator().manual_seed(pooling)
            batches = [criteo.batch(gen, args.batch, pooling, table_defs) for _ in range(4)]
            grads = [torch.randn(args.batch, 64 * len(table_defs), generator=gen) * 1e-3 for _ in range(2)]
            in_process_rate(table_defs, batches, grads, 3)  # warm-up
            rates: dict[str, list[float]] = {}
            lats: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                rates.setdefault("in_process", []).append(in_process_rate(table_defs, batches, grads, args.steps))
                for wire in args.wire:
                    key = f"grpc_1/{wire}"
                    start = step_counter["grpc_1"]
                    step_counter["grpc_1"] += args.steps + 5
                    rate, lat = client_loop(shards["grpc_1"].address, 0, args.batch, pooling, args.steps, wire,
                                            not args.no_pipeline, start, id_dtype)
                    rates.setdefault(key, []).append(rate)
                    lats.setdefault(key, []).extend(lat)
                    if "grpc_2sync" in shards:
                        key = f"grpc_2sync/{wire}"
                        start = step_counter["grpc_2sync"]
                        step_counter["grpc_2sync"] += args.steps + 5
                        queue = ctx.Queue()
                        workers = [ctx.Process(target=_worker, args=(
                            (shards["grpc_2sync"].address, t, args.batch // 2, pooling, args.steps, wire,
                             not args.no_pipeline, start, id_dtype), queue)) for t in range(2)]
                        for w in workers:
                            w.start()
                        results = [queue.get(timeout=600) for _ in workers]
                        for w in workers:
                            w.join()
                        rates.setdefault(key, []).append(min(r for r, _ in results) * 2)
                        lats.setdefault(key, []).extend(x for _, lat in results for x in lat)
            base = statistics.median(rates["in_process"])
            for key, vals in rates.items():
                med = statistics.median(vals)
                rec = {"bench": "shard_throughput", "variant": key, "pooling": pooling, "batch": args.batch,
                       "samples_per_s": round(med), "runs": [round(v) for v in vals],
                       "ratio_vs_in_process": round(med / base, 3),
                       "step_ms": round(args.batch / med * 1000, 2)}
                if key in lats:
                    q = statistics.quantiles(lats[key], n=100)
                    rec.update(lookup_p50_ms=round(q[49] * 1000, 2), lookup_p99_ms=round(q[98] * 1000, 2))
                    rec["target"] = 0.7 if pooling >= 20 else 0.4
                emit(rec)
        for name, proc in shards.items():
            with ShardClient(proc.address) as c:
                memory("shard_memory_after", name, c.info())
    finally:
        for proc in shards.values():
            proc.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
