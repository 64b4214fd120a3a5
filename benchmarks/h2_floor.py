"""What a gRPC call costs serve-native's frontend on each HTTP/2 engine: grpc++ (--engine grpc) against nghttp2
(--engine h2), answered and refused.

A refusal costs grpc++ a whole call (~20 us of CPU, an answered W1 request ~26 us of frontend + ~40 us of
worker), which held W1's 2x overload goodput at 0.6-0.8 of the maximum (benchmarks/gateway_frontend.md); this
priced refusing below gRPC before the h2 engine was built, and keeps measuring it. In one run, frontend.cc on
each engine, measured in turn per round with h2load's closed loop (4 connections, 64 streams by default) and
CPU of the server per call from /proc:

- grpc_echo / h2_echo: `--echo`, an empty OK message at once;
- grpc_refuse / h2_refuse: no worker connected, every call refused at arrival (UNAVAILABLE with a message,
  trailers only: the path an admission refusal takes).

A closed loop lets nghttp2 answer ~400k calls/s, where each read and write carries many calls; so each round
also offers every server the same open-loop rate (--rate, h2load's rate mode, default 40,000 calls/s: W1's
2x overload sends ~50-75k/s), where the CPU per call is what a gateway at that rate pays. Then the medians
and the ratios h2 / grpc. With --tls each of the four also runs over TLS beside it (`*_tls`: a self-signed P-256
certificate made here; h2load over https, ALPN h2), measured in the same rounds: what TLS adds to a call on each
engine (`tls_vs_plain`). Needs g++, grpc++, nghttp2 and OpenSSL (`make install`) and h2load.

    python -m benchmarks.h2_floor [--rounds 3] [--seconds 4] [--concurrency 64] [--rate 40000] [--tls]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.gateway_load import emit
from benchmarks.h2 import cpu_seconds_since, cpu_ticks, ensure_h2load, h2load_with_cpu, rate_result, start_rate
from benchmarks.native_floor import start_binary
from inference_gateway.loadgen import METHOD
from inference_gateway.native.build import build
from protos.security import write_self_signed

SERVERS = ("grpc_echo", "grpc_refuse", "h2_echo", "h2_refuse")
BODY = b"\x1a" + bytes(500)  # a W1 Predict's size; neither server reads it


def start_servers(work: Path, names: list[str]) -> tuple[dict[str, tuple[str, int]], list[subprocess.Popen]]:
    """Each server of `names` (SERVERS, and with a _tls suffix over TLS): its address (https://… for TLS) and pid."""
    binary = str(build())
    tls = []
    if any(n.endswith("_tls") for n in names):  # h2load does not verify it; a grpc client trusts floor.crt itself
        cert, key = write_self_signed(work, "floor")
        tls = ["--tls-cert", cert, "--tls-key", key]
    servers, procs = {}, []
    for name in names:
        engine, mode = name.split("_")[:2]
        secure = name.endswith("_tls")
        cmd = [binary, "--engine", engine, *(tls if secure else []),
               *(["--echo"] if mode == "echo" else ["--socket", str(work / f"{name}.sock")])]
        proc, port = start_binary(cmd, work, 30)
        procs.append(proc)
        servers[name] = (f"{'https://' if secure else ''}127.0.0.1:{port}", proc.pid)
    return servers, procs


def at_rate(address: str, pid: int, rate: float, seconds: float, work: Path) -> dict:
    """h2load offering `rate` calls/s for `seconds`: calls done per second and the server's CPU us per call."""
    before = cpu_ticks([pid])
    proc, log = start_rate(address, METHOD, BODY, rate, seconds, work)
    r = rate_result(proc, log, seconds, 0)
    spent = sum(cpu_seconds_since(before, [pid]).values())
    if "error" in r or not r.get("ok"):
        raise SystemExit(f"h2_floor: h2load's rate mode against {address} failed: {r.get('error')}")
    return {"calls_per_s": r["requests_per_s"], "cpu_us_per_call": round(spent / r["ok"] * 1e6, 2),
            "p99_ms": r.get("p99_ms"), "failed": r["failed"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="each server measured once per round; medians at the end")
    p.add_argument("--seconds", type=float, default=4.0, help="per h2load run")
    p.add_argument("--concurrency", type=int, default=64, help="streams in flight (4 connections)")
    p.add_argument("--rate", type=float, default=40000.0, help="calls/s of the open-loop phase (0: none)")
    p.add_argument("--tls", action="store_true", help="each server also over TLS, beside its plaintext twin "
                   "(h2load over https, ALPN h2)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "h2-floor"))
    args = p.parse_args(argv)
    if ensure_h2load() is None:
        raise SystemExit("h2_floor: h2load is missing (Debian: apt-get install nghttp2-client)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    names = [*SERVERS, *([f"{s}_tls" for s in SERVERS] if args.tls else [])]
    servers, procs = start_servers(work, names)
    common = {"bench": "h2_floor", "cpus": os.cpu_count(), "concurrency": args.concurrency}
    per_call: dict[str, list[float]] = {s: [] for s in names}
    rate: dict[str, list[float]] = {s: [] for s in names}
    at: dict[str, list[float]] = {s: [] for s in names}
    try:
        for k in range(args.rounds):
            for name in names:
                address, pid = servers[name]
                r = h2load_with_cpu(address, METHOD, BODY, args.concurrency, args.seconds, work, [pid])
                if "error" in r or not r.get("ok"):
                    raise SystemExit(f"h2_floor: h2load against {name} failed: {r.get('error')}")
                us = round(r["cpu_s_per_1000"] * 1000, 2)  # CPU-seconds per 1,000 calls -> us per call
                per_call[name].append(us)
                rate[name].append(r["requests_per_s"])
                emit({**common, "round": k, "server": name, "loop": "closed", "calls_per_s": r["requests_per_s"],
                      "cpu_us_per_call": us, "failed": r["failed"]})
                if args.rate:
                    o = at_rate(address, pid, args.rate, args.seconds, work)
                    at[name].append(o["cpu_us_per_call"])
                    emit({**common, "round": k, "server": name, "loop": "open", "offered_per_s": args.rate, **o})
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for loop, figures in (("closed", per_call), ("open", at)):
        if not figures["h2_echo"]:
            continue
        med = {s: statistics.median(figures[s]) for s in names}
        suffixes = ("", "_tls") if args.tls else ("",)
        emit({**common, "medians": True, "loop": loop, "rounds": args.rounds, "cpu_us_per_call": med,
              **({"calls_per_s": {s: statistics.median(rate[s]) for s in names}} if loop == "closed"
                 else {"offered_per_s": args.rate}),
              "h2_vs_grpc": {f"{m}{t}": round(med[f"h2_{m}{t}"] / med[f"grpc_{m}{t}"], 3)
                             for t in suffixes for m in ("echo", "refuse")},
              **({"tls_vs_plain": {s: round(med[f"{s}_tls"] / med[s], 3) for s in SERVERS}} if args.tls else {})})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
