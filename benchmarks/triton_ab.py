"""Two serve-triton configurations launched alternately (JSON lines, one per measurement): an A/B of flags.

For each of --reps rounds, `serve-triton` (its defaults, 2 workers, batches of at most 256 samples) once
with --a's extra flags and once with --b's, each driven by h2load at 1, 64 and 512 streams (requests/s,
mean and maximum latency) and by an h2load open loop at --rate (p50 / p99 / maximum); a final record
gives each side's medians. Alternating launches keep a noisy shared host's drift out of the comparison.
The default A/B is the queue bound: Triton 2.51's dynamic batcher prepares batches ahead of busy
workers ("prefetch") only when the queue has no policy, and with a bound waits for an idle worker on a
wakeup that only the next arrival (or its 500 ms timeout) sends (benchmarks/gateway_frontend.md, "No
queue bound by default").

    python -m benchmarks.triton_ab [--a "--max-queue-wait-ms 30"] [--b ""] [--dtype int8] [--workers 2]
        [--reps 3] [--seconds 5] [--rate 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.gateway_load import ROOT, _load, emit, infer_pool, packages
from benchmarks.h2 import ensure_h2load, h2load, rate_result, start_rate
from inference_gateway.loadgen import OIP_METHOD
from inference_gateway.process import launch_triton
from protos.model_config import ModelConfig

STREAMS = (1, 64, 512)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="int8", choices=("fp32", "int8", "int4"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=5000.0, help="open-loop requests/s (about half the maximum)")
    p.add_argument("--a", default="--max-queue-wait-ms 30", help="side a's extra serve-triton flags")
    p.add_argument("--b", default="", help="side b's extra serve-triton flags (default: none, the defaults)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gateway-bench"))
    args = p.parse_args(argv)
    if ensure_h2load() is None:
        raise SystemExit("triton_ab: h2load is missing (Debian: apt-get install nghttp2-client)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pkg = packages(work, [args.dtype])[args.dtype]
    name = json.loads((pkg / "manifest.json").read_text())["name"]
    body = infer_pool(ModelConfig.load(ROOT / "configs" / "criteo_kaggle.yaml"), 1, 1, name)[0]
    runs: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        for side, extra in (("a", args.a.split()), ("b", args.b.split())):
            gw = launch_triton(["--model", str(pkg), "--metrics-port", "-1", "--workers", str(args.workers),
                                "--max-batch-size", "256", *extra],
                               workdir=work / f"triton-ab-{side}-{rep}", timeout=600)
            base = {"bench": "triton_ab", "dtype": args.dtype, "workers": args.workers, "side": side,
                    "flags": " ".join(extra), "rep": rep}
            try:
                for c in STREAMS:
                    r = h2load(gw.address, OIP_METHOD, body, c, args.seconds if c > 1 else 3, work)
                    runs.setdefault((side, f"c{c}_per_s"), []).append(r["requests_per_s"])
                    runs.setdefault((side, f"c{c}_max_ms"), []).append(r.get("max_ms", 0.0))
                    emit({**base, "client": "h2load", "concurrency": c, **r, "loadavg": _load()})
                proc, log = start_rate(gw.address, OIP_METHOD, body, args.rate, args.seconds, work)
                r = rate_result(proc, log, args.seconds, 0)
                runs.setdefault((side, "open_p99_ms"), []).append(r.get("p99_ms", 0.0))
                emit({**base, "client": "h2load_rate", "offered_per_s": args.rate, **r, "loadavg": _load()})
            finally:
                gw.terminate()
    medians = {s: {k: round(statistics.median(v), 2) for (s2, k), v in runs.items() if s2 == s} for s in "ab"}
    emit({"bench": "triton_ab_medians", "dtype": args.dtype, "reps": args.reps, "a_flags": args.a, "b_flags": args.b,
          **medians})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
