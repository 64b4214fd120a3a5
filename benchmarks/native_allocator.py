"""serve-native on glibc's malloc against jemalloc (`--allocator glibc` / `jemalloc`), side by side.

Per round, one gateway of each (INT8 Criteo package, --workers, started in turn, the other stopped), h2load
W1 Predict at 64 and 512 streams: answered calls/s and the CPU ms every process of the gateway spent per
answered call, by process (frontend, python workers). Then the medians of each, and jemalloc / glibc.
Rounds alternate which goes first, because this host drifts by tens of percent within minutes.

    python -m benchmarks.native_allocator [--rounds 3] [--seconds 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.gateway_load import _load, answer_frame_bytes, emit, packages, request_pool
from benchmarks.h2 import ensure_h2load, h2load_with_cpu
from inference_gateway import proc_memory
from inference_gateway.allocator import Allocator, preload
from inference_gateway.loadgen import METHOD
from inference_gateway.process import launch_native
from protos.model_config import ModelConfig
from protos.process import stop_all

ROOT = Path(__file__).resolve().parents[1]
ALLOCATORS = ("glibc", "jemalloc")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="per h2load run")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "native-allocator"))
    args = p.parse_args(argv)
    if ensure_h2load() is None:
        raise SystemExit("native_allocator: h2load is missing (Debian: apt-get install nghttp2-client)")
    if preload(Allocator.AUTO) is None:
        raise SystemExit("native_allocator: jemalloc is missing (Debian: apt-get install libjemalloc2)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.load(ROOT / "configs" / "criteo_kaggle.yaml")
    pkg = packages(work, ["int8"])["int8"]
    body = request_pool(cfg, 1, 1)[0]
    common = {"bench": "native_allocator", "cpus": os.cpu_count(), "workers": args.workers, "dtype": "int8"}
    runs: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for allocator in ALLOCATORS[::1 if rnd % 2 == 0 else -1]:  # each goes first every other round
            gw = launch_native(["--model", str(pkg), "--workers", str(args.workers), "--metrics-port", "-1",
                                "--max-queue-wait-ms", "20", "--allocator", allocator], workdir=work / allocator)
            try:
                frame = answer_frame_bytes(gw.address, METHOD, body)
                for c in (64, 512):
                    r = h2load_with_cpu(gw.address, METHOD, body, c, args.seconds, work, proc_memory.tree(gw.pid),
                                        frame)
                    rec = {**common, "round": rnd, "allocator": allocator, "concurrency": c,
                           "requests_per_s": r.get("answered_per_s"), "cpu_ms_per_request": r.get("cpu_s_per_1000"),
                           "cpu_ms_by_process": r.get("cpu_s_per_1000_by_process"), "loadavg": _load()}
                    runs.setdefault((allocator, c), []).append(rec)
                    emit(rec)
            finally:
                stop_all([gw.proc], 30)
    summary = {}
    for c in (64, 512):
        med = {a: {k: statistics.median(r[k] for r in runs[a, c]) for k in ("requests_per_s", "cpu_ms_per_request")}
               for a in ALLOCATORS}
        summary[f"c{c}"] = {**med, "jemalloc_vs_glibc": {
            k: round(med["jemalloc"][k] / med["glibc"][k], 3) for k in ("requests_per_s", "cpu_ms_per_request")}}
    emit({**common, "summary": "medians over rounds", "rounds": args.rounds, **summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
