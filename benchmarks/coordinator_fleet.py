"""The coordinator at fleet size: 256 shards and 64 trainers heartbeating, trainers holding WatchPlan streams.

A real coordinator process (embedded Redis) and the members it would see in production, each driven by the
project's own `protos.member_agent.MemberAgent` (register, then heartbeat every lease/3 +- 10%) and,
for trainers, `protos.coordinator_client.CoordinatorClient` (a WatchPlan stream held open, GetPlan every
`--getplan-every-s`). The members run as threads in a few worker processes. After every member is
registered and alive, a window of `--window-s` seconds is measured:

- coordinator CPU (user + system of its process, in cores) and, apart, the embedded redis-server's;
- Redis commands per second (`INFO stats` total_commands_processed before / after) and the top commands;
- Heartbeat and GetPlan latency p50 / p99 as the clients see them;
- then one extra shard agent (run by this process) stops heartbeating without leaving, and ListMembers is
  polled until the coordinator marks it DEAD: the detection time against the lease.

Targets: heartbeat p99 <= 50 ms, coordinator <= 0.5 core, detection <= lease + 1 s. One JSON line of
results (plus one line per phase on stderr as it goes).

    python -m benchmarks.coordinator_fleet [--shards 256] [--trainers 64] [--processes 4] [--window-s 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
import redis
from tqdm import tqdm

from coordinator.process import launch
from protos import common_pb2, coordinator_pb2
from protos.coordinator_client import CoordinatorClient
from protos.member_agent import MemberAgent
from protos.plan import dump_plan

pb = coordinator_pb2


class TimedStub:
    """The agent's coordinator stub with every Heartbeat timed (wall start, seconds) into `samples`."""

    def __init__(self, stub, samples: list[tuple[float, float]]) -> None:
        self._stub, self._samples = stub, samples
        self.Register, self.Leave = stub.Register, stub.Leave

    def Heartbeat(self, request, timeout=None):
        start, t0 = time.time(), time.perf_counter()
        try:
            return self._stub.Heartbeat(request, timeout=timeout)
        finally:
            self._samples.append((start, time.perf_counter() - t0))


def _members(ids: list[tuple[int, int]]) -> list[pb.Member]:
    return [pb.Member(kind=kind, id=i, address=f"127.0.0.1:{20000 + i}" if kind == pb.SHARD else "",
                      device="cpu", capacity_bytes=1 << 30) for kind, i in ids]


def _trainer_loop(address: str, trainer_id: int, stop, getplan_every_s: float,
                  samples: list[tuple[float, float]], errors: list[str]) -> None:
    """A trainer's coordinator traffic besides heartbeats: one WatchPlan stream held open, GetPlan now and then."""
    client = CoordinatorClient(address, timeout=10)
    stream = client.watch_plan(trainer_id)

    def drain() -> None:
        try:
            for _ in stream:
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"WatchPlan trainer {trainer_id}: {e.code().name} {e.details()}")

    threading.Thread(target=drain, daemon=True).start()
    while not stop.wait(getplan_every_s * (0.5 + (trainer_id % 16) / 16)):  # spread over the period
        start, t0 = time.time(), time.perf_counter()
        try:
            client.get_plan()
            samples.append((start, time.perf_counter() - t0))
        except grpc.RpcError as e:
            errors.append(f"GetPlan trainer {trainer_id}: {e.code().name} {e.details()}")
    stream.cancel()
    client.close()


def _worker(address: str, ids: list[tuple[int, int]], getplan_every_s: float, started, stop, results) -> None:
    """One client process: an agent per member (a thread each), a WatchPlan + GetPlan loop per trainer."""
    beats: list[tuple[float, float]] = []
    plans: list[tuple[float, float]] = []
    errors: list[str] = []
    agents = []
    for m in _members(ids):
        agent = MemberAgent(address, m, lambda: (1, 0))
        agent.stub = TimedStub(agent.stub, beats)
        agents.append(agent.start())
    tstop = threading.Event()
    loops = [threading.Thread(target=_trainer_loop, args=(address, i, tstop, getplan_every_s, plans, errors),
                              daemon=True) for kind, i in ids if kind == pb.TRAINER]
    for t in loops:
        t.start()
    started.release()
    stop.wait()
    tstop.set()
    for t in loops:
        t.join(timeout=15)
    for a in agents:
        a.stop(leave=False)
    results.put({"beats": beats, "plans": plans, "errors": errors[:20],
                 "unregistered": sum(1 for a in agents if not a.registered.is_set())})


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _redis_process(r: redis.Redis) -> psutil.Process | None:
    """The embedded redis-server (INFO names its pid); None when it is not on this machine."""
    try:
        return psutil.Process(int(r.info("server")["process_id"]))
    except psutil.Error:
        return None


def _log(msg: str) -> None:
    print(json.dumps({"event": msg, "at": round(time.time(), 3)}), file=sys.stderr, flush=True)


def _wait_alive(client: CoordinatorClient, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with tqdm(total=expected, desc="members alive", file=sys.stderr) as bar:
        while True:
            alive = sum(1 for m in client.members() if m.state == pb.ALIVE)
            bar.update(alive - bar.n)
            if alive >= expected:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {alive} of {expected} members alive after {timeout_s} s")
            time.sleep(0.5)


def run(args: argparse.Namespace) -> dict:
    plan = common_pb2.ShardingPlan(version=1, num_shards=args.shards)
    opt = common_pb2.OptimizerConfig(type=common_pb2.EXACT_ROWWISE_ADAGRAD, learning_rate=0.05)
    for s in range(args.shards):
        plan.tables.add(name=f"t{s}", num_rows=1000, dim=16, features=[f"f{s}"], optimizer=opt)
        plan.slices.add(shard=s, slice=common_pb2.TableSlice(table=f"t{s}", row_offset=0, num_rows=1000,
                                                             col_offset=0, num_cols=16))
    work = Path(tempfile.mkdtemp(prefix="coordinator-fleet-"))
    (work / "plan.json").write_text(dump_plan(plan))
    coord = launch(["--lease-s", str(args.lease_s), "--log-level", "WARNING", "--metrics-port", "-1",
                    "--initial-plan", str(work / "plan.json")], workdir=work / "coordinator")
    address = coord.address
    procs: list[mp.Process] = []
    ctx = mp.get_context("spawn")
    started, stop, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    try:
        cproc = psutil.Process(coord.pid)
        r = redis.Redis.from_url(coord.announced["redis"])
        rproc = _redis_process(r)
        client = CoordinatorClient(address, timeout=30)
        # the last shard is this process's: it falls silent for the detection measurement
        ids = [(pb.SHARD, s) for s in range(args.shards - 1)] + [(pb.TRAINER, t) for t in range(args.trainers)]
        chunks = [ids[i::args.processes] for i in range(args.processes)]
        _log("starting members")
        procs = [ctx.Process(target=_worker, args=(address, c, args.getplan_every_s, started, stop, results),
                             daemon=True) for c in chunks]
        for p in procs:
            p.start()
        victim = MemberAgent(address, _members([(pb.SHARD, args.shards - 1)])[0], lambda: (1, 0)).start(wait_s=30)
        for _ in procs:
            if not started.acquire(timeout=300):
                raise TimeoutError("a client process did not start its agents within 300 s")
        _wait_alive(client, args.shards + args.trainers, timeout_s=120)
        time.sleep(args.settle_s)
        _log("measuring")
        c0, r0 = _cpu_s(cproc), (_cpu_s(rproc) if rproc else 0.0)
        cmd0, t0 = int(r.info("stats")["total_commands_processed"]), time.time()
        stats0 = r.info("commandstats")
        for _ in tqdm(range(int(args.window_s)), desc="window (s)", file=sys.stderr):
            time.sleep(1)
        c1, r1 = _cpu_s(cproc), (_cpu_s(rproc) if rproc else 0.0)
        cmd1, t1 = int(r.info("stats")["total_commands_processed"]), time.time()
        stats1 = r.info("commandstats")
        alive_end = sum(1 for m in client.members() if m.state == pb.ALIVE)
        _log("silencing one shard")
        victim.stop(leave=False)  # joins its thread: no heartbeat in flight after this
        silenced = time.time()
        last_ack_wall = silenced - (time.monotonic() - victim._last_ack)
        while True:
            m = next((m for m in client.members() if m.kind == pb.SHARD and m.id == args.shards - 1), None)
            if m is None or m.state == pb.DEAD:
                break
            if time.time() - silenced > args.lease_s + 30:
                raise TimeoutError("the silent shard was never marked dead")
            time.sleep(0.05)
        detected = time.time()
        stop.set()
        out = [results.get(timeout=120) for _ in procs]
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        coord.terminate()
    window = t1 - t0
    beats = [lat for o in out for start, lat in o["beats"] if t0 <= start <= t1]
    plans = [lat for o in out for start, lat in o["plans"] if t0 <= start <= t1]
    top = sorted(((k.removeprefix("cmdstat_"), (v["calls"] - stats0.get(k, {"calls": 0})["calls"]) / window)
                  for k, v in stats1.items()), key=lambda kv: -kv[1])[:8]
    cores = (c1 - c0) / window
    detect = detected - last_ack_wall
    hb_p99 = _pct(beats, 0.99)
    return {
        "benchmark": "coordinator_fleet", "shards": args.shards, "trainers": args.trainers,
        "client_processes": args.processes, "lease_s": args.lease_s, "window_s": round(window, 2),
        "alive_at_window_end": alive_end,
        "heartbeats_per_s": round(len(beats) / window, 1),
        "heartbeat_p50_ms": _ms(_pct(beats, 0.5)), "heartbeat_p99_ms": _ms(hb_p99),
        "heartbeat_max_ms": _ms(max(beats) if beats else None),
        "getplan_per_s": round(len(plans) / window, 1),
        "getplan_p50_ms": _ms(_pct(plans, 0.5)), "getplan_p99_ms": _ms(_pct(plans, 0.99)),
        "watchplan_streams": args.trainers,
        "coordinator_cores": round(cores, 3), "redis_server_cores": round((r1 - r0) / window, 3),
        "redis_commands_per_s": round((cmd1 - cmd0) / window, 1),
        "redis_top_commands_per_s": {k: round(v, 1) for k, v in top},
        "detect_from_last_heartbeat_s": round(detect, 3), "detect_from_silence_s": round(detected - silenced, 3),
        "detect_target_s": args.lease_s + 1,
        "targets": {"heartbeat_p99_le_50ms": hb_p99 is not None and hb_p99 <= 0.05,
                    "coordinator_le_0.5_core": cores <= 0.5, "detect_le_lease_plus_1s": detect <= args.lease_s + 1},
        "client_errors": [e for o in out for e in o["errors"]][:10],
        "unregistered_agents": sum(o["unregistered"] for o in out),
        "host_cpus": psutil.cpu_count(), "host_load_1m": round(psutil.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=256)
    ap.add_argument("--trainers", type=int, default=64)
    ap.add_argument("--processes", type=int, default=4, help="client processes the members are spread over")
    ap.add_argument("--lease-s", type=float, default=5.0, help="the coordinator's lease (agents beat every lease/3 "
                    "+- 10%%; --lease-s 1.5 gives the former 0.5 s cadence)")
    ap.add_argument("--window-s", type=float, default=20.0, help="measured window once every member is alive")
    ap.add_argument("--settle-s", type=float, default=3.0, help="wait after all are alive before measuring")
    ap.add_argument("--getplan-every-s", type=float, default=2.0, help="each trainer's GetPlan period (about)")
    args = ap.parse_args(argv)
    if args.shards < 2 or args.trainers < 1 or args.processes < 1:
        ap.error("--shards must be >= 2, --trainers and --processes >= 1")
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
