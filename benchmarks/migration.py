"""Live re-sharding: migration throughput and the training pause.

    python -m benchmarks.migration [--rows 1000000] [--dim 64] [--rounds 3]

Prints one JSON line per result:
  migration   - PullRows of `rows` x `dim` rows (+ row-wise Adagrad state) from one shard process into a
                standby one on loopback (sha256 checked per chunk), MB/s; against raw_stream, a plain gRPC
                server stream of the same bytes in the same chunk size between two processes (the wire
                limit); medians of --rounds, interleaved, and their ratio (target >= 0.7)
  pause       - a trainer training through a coordinator while a plan moves the whole table to another
                shard: how long the trainers were fenced (fence -> resume), the rollout's own figures,
                and the median step time before and after
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
_RAW = "/bench.Raw/Stream"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def raw_server(total: int, chunk: int) -> None:
    """A gRPC server that streams `total` bytes in `chunk`-sized messages (bytes in, bytes out)."""
    payload = bytes(chunk)

    def stream(request: bytes, context):
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            yield payload if n == chunk else payload[:n]
            sent += n

    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", 64 << 20)])
    handler = grpc.method_handlers_generic_handler("bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=lambda b: b, response_serializer=lambda b: b)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    server.wait_for_termination()


def raw_rate(address: str, total: int) -> float:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    call = channel.unary_stream(_RAW, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    start = time.perf_counter()
    got = sum(len(chunk) for chunk in call(b""))
    elapsed = time.perf_counter() - start
    channel.close()
    assert got == total
    return total / elapsed / 1e6


def table(rows: int, dim: int) -> dict:
    return {"name": "big", "num_rows": rows, "dim": dim, "features": ["f"],
            "optimizer": {"type": "exact_rowwise_adagrad", "learning_rate": 0.01}}


def migration(args: argparse.Namespace) -> None:
    from embedding_service.process import launch
    from protos import embedding_shard_pb2
    from protos.plan import assignment_from_dict
    from protos.shard_client import ShardClient

    work = Path(tempfile.mkdtemp(prefix="bench-migration-"))
    src = launch({"shard_id": 0, "plan_version": 1, "tables": [table(args.rows, args.dim)]}, workdir=work / "src")
    dst = launch({"shard_id": 1, "plan_version": 0, "tables": [], "slices": []}, workdir=work / "dst")
    row_bytes = args.dim * 4 + 4
    total = args.rows * row_bytes
    chunk_rows = max(1, int(args.chunk_mb * 2**20) // row_bytes)
    raw = subprocess.Popen([sys.executable, "-m", "benchmarks.migration", "--raw-server", str(total),
                            "--raw-chunk", str(chunk_rows * row_bytes)],
                           stdout=subprocess.PIPE, text=True, cwd=ROOT)
    raw_port = json.loads(raw.stdout.readline())["port"]
    pulled, raw_rates = [], []
    try:
        dst_client = ShardClient(dst.address, plan_version=0, timeout=600)
        for r in range(args.rounds):
            version = 2 + r
            a = assignment_from_dict({"shard_id": 1, "plan_version": version, "tables": [table(args.rows, args.dim)]})
            dst_client.prepare(a)
            start = time.perf_counter()
            resp = dst_client.pull_rows(embedding_shard_pb2.PullRowsRequest(
                plan_version=version, source=src.address, source_plan_version=1, source_slice=0, row_start=0,
                row_end=args.rows, dest_slice=0, chunk_rows=chunk_rows))
            pulled.append(resp.bytes / (time.perf_counter() - start) / 1e6)
            assert resp.rows == args.rows and resp.bytes == total
            dst_client.abort(version)
            raw_rates.append(raw_rate(f"127.0.0.1:{raw_port}", total))
        emit({"bench": "migration", "rows": args.rows, "dim": args.dim, "mb": round(total / 1e6, 1),
              "rounds": args.rounds, "chunk_mb": args.chunk_mb, "pull_mb_s": [round(x, 1) for x in pulled],
              "raw_stream_mb_s": [round(x, 1) for x in raw_rates],
              "pull_mb_s_median": round(statistics.median(pulled), 1),
              "raw_stream_mb_s_median": round(statistics.median(raw_rates), 1),
              "ratio": round(statistics.median(pulled) / statistics.median(raw_rates), 3), "target": 0.7})
    finally:
        raw.kill()
        src.kill()
        dst.kill()


def pause(args: argparse.Namespace) -> None:
    """One trainer, tables big (rows x dim) and small; v2 moves big from shard 0 to a standby shard 2."""
    import yaml

    from coordinator.launcher import LocalShards, LocalTrainers
    from coordinator.process import launch
    from protos import common_pb2, coordinator_pb2
    from protos.coordinator_client import CoordinatorClient, final
    from protos.model_config import ModelConfig
    from protos.plan import dump_plan, simple_plan

    work = Path(tempfile.mkdtemp(prefix="bench-pause-"))
    cfg = {"dense": {"dense_features": 13, "bottom_mlp": [64, args.dim], "top_mlp": [64, 1], "dense_lr": 0.01},
           "tables": [table(args.rows, args.dim), {**table(1000, args.dim), "name": "small", "features": ["g"]}]}
    (work / "model.yaml").write_text(yaml.safe_dump(cfg))
    model = ModelConfig.load(work / "model.yaml")
    v1 = simple_plan(model, 2)
    v2 = common_pb2.ShardingPlan()
    v2.CopyFrom(v1)
    v2.num_shards = 3
    next(s for s in v2.slices if s.slice.table == "big").shard = 2
    (work / "v1.json").write_text(dump_plan(v1))
    coord = launch(["--initial-plan", str(work / "v1.json")], workdir=work / "coordinator")
    client = CoordinatorClient(coord.address, token=coord.token)
    shards = LocalShards(coord.address, work, num_trainers=1)
    trainers = None
    try:
        shards.start(0, v1)
        shards.start(1, v1)
        shards.start(2, None)
        while sum(1 for m in client.members() if m.kind == coordinator_pb2.SHARD) < 3:
            time.sleep(0.1)
        trainers = LocalTrainers(coord.address, work / "model.yaml", 1,
                                 ["--steps", str(args.steps), "--batch-size", "2048", "--json"], work)
        trainers.start(resume=False)
        while not [m for m in client.members() if m.kind == coordinator_pb2.TRAINER and m.step >= 20]:
            time.sleep(0.05)
        progress = final(client.apply(v2, author="bench", reason="move 1M rows"))
        while trainers.poll() is None:
            time.sleep(0.2)
        steps = [json.loads(line) for line in trainers.stdout().splitlines() if line.startswith('{"step"')]
        assert progress.phase == coordinator_pb2.DONE, progress.message
        emit({"bench": "pause", "rows": args.rows, "dim": args.dim, "mb_moved": round(progress.bytes_done / 1e6, 1),
              "pause_s": round(progress.pause_s, 3), "fence_step": progress.fence_step,
              "migration_mb_s": round(progress.bytes_done / 1e6 / max(progress.pause_s, 1e-9), 1),
              "trainer_steps": len(steps), "trainer_exit": trainers.poll()})
    finally:
        if trainers is not None:
            trainers.stop()
        shards.stop_all()
        client.close()
        coord.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=120, help="pause: trainer steps (the rollout starts at step 20)")
    p.add_argument("--only", choices=["migration", "pause"])
    p.add_argument("--chunk-mb", type=float, default=4.0, help="migration: bytes per streamed message")
    p.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    p.add_argument("--raw-chunk", type=int, default=4 << 20, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw_server:
        raw_server(args.raw_server, args.raw_chunk)
        return
    if args.only in (None, "migration"):
        migration(args)
    if args.only in (None, "pause"):
        pause(args)


if __name__ == "__main__":
    main()
