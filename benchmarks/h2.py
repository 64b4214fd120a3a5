"""h2load (nghttp2's native HTTP/2 load generator) as a gRPC client, and the CPU a server spends under it.

Shared by gateway_load and gateway_frontend. h2load knows HTTP/2, not gRPC: it sends one framed message
per stream and counts HTTP statuses, and gRPC answers every call, refused ones included, with HTTP 200
(the grpc-status is in the trailers). So h2load alone cannot tell an answer from a refusal; what it can
tell is how many answers carried a message: a refusal is trailers-only (no DATA), so DATA bytes received
divided by one answer's framed size estimates the answered calls (`ok_estimated`).
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from inference_gateway.native.build import install_debian

TICK = os.sysconf("SC_CLK_TCK")


def ensure_h2load() -> str | None:
    """h2load (Debian's nghttp2-client), installed with apt-get when missing and running as root."""
    if shutil.which("h2load") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        install_debian(["nghttp2-client"])
    return shutil.which("h2load")


def cpu_ticks(pids: list[int]) -> dict[str, int]:
    """utime + stime per kind of process (its comm: python, tritonserver, triton_python_b[ackend_stub])."""
    out: dict[str, int] = {}
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[comm] = out.get(comm, 0) + int(fields[11]) + int(fields[12])
    return out


def cpu_seconds_since(before: dict[str, int], pids: list[int]) -> dict[str, float]:
    """CPU-seconds per kind of process that `pids` spent since `before` (a `cpu_ticks` of them)."""
    return {k: (v - before.get(k, 0)) / TICK for k, v in cpu_ticks(pids).items()}


def steal_s() -> float:
    """CPU-seconds the hypervisor has taken from this machine's virtual CPUs since boot (/proc/stat's steal;
    0 on bare metal). Read around a phase: a tail of ~100 ms with steal in it is the host's, not the server's
    (on this machine kind W2's 2x refusal tails of 80-90 ms came with steal bursts of ~0.1 s)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    return int(fields[8]) / TICK if len(fields) > 8 else 0.0


def _body(body: bytes, workdir: Path) -> Path:
    path = workdir / f"body-{abs(hash(body))}.bin"
    path.write_bytes(b"\0" + struct.pack(">I", len(body)) + body)  # one gRPC message frame
    return path


def _command(address: str, method: str, body: bytes, workdir: Path, seconds: float, conns: int,
             streams: int) -> list[str]:
    return ["h2load", "-D", str(max(1, int(seconds))), *_rest(address, method, body, workdir, conns, streams)]


def _rest(address: str, method: str, body: bytes, workdir: Path, conns: int, streams: int) -> list[str]:
    return ["-c", str(conns), "-m", str(streams),
            "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(_body(body, workdir)),
            f"{address if '://' in address else 'http://' + address}{method}"]  # https://HOST:PORT: over TLS


def parse(text: str) -> dict:
    """h2load's summary: completed streams per second, done / failed streams, DATA bytes received."""
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", text)
    rps = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", text)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", text)
    data = re.search(r"traffic: .*?\((\d+)\) data", text)
    if not (done and rps):
        return {"error": text[-500:]}
    return {"requests_per_s": float(rps.group(2)), "ok": int(done.group(2)), "failed": int(done.group(3)),
            "seconds": float(rps.group(1)), "data_bytes": int(data.group(1)) if data else None,
            "mean_ms": _ms(lat.group(3)) if lat else None, "max_ms": _ms(lat.group(2)) if lat else None}


def h2load(address: str, method: str, body: bytes, concurrency: int, seconds: float, workdir: Path) -> dict:
    """Closed loop over `concurrency` streams (4 connections x concurrency/4 streams) for `seconds`."""
    conns = min(4, concurrency)
    out = subprocess.run(_command(address, method, body, workdir, seconds, conns, concurrency // conns),
                         capture_output=True, text=True, timeout=seconds + 120)
    r = parse(out.stdout)
    if "error" in r and out.stderr:
        r["error"] = out.stderr[-500:]
    return r


def answered(r: dict, ok_frame_bytes: int) -> dict:
    """Adds ok_estimated, refused_estimated and answered_per_s: DATA bytes over one answer's frame size."""
    if r.get("data_bytes") is not None and ok_frame_bytes > 0:
        r["ok_estimated"] = r["data_bytes"] // ok_frame_bytes
        r["refused_estimated"] = max(0, r["ok"] - r["ok_estimated"])
        r["answered_per_s"] = round(r["ok_estimated"] / r["seconds"], 1) if r["seconds"] else 0.0
    return r


def h2load_with_cpu(address: str, method: str, body: bytes, concurrency: int, seconds: float, workdir: Path,
                    pids: list[int], ok_frame_bytes: int = 0) -> dict:
    """h2load's closed loop, plus the CPU-seconds the processes `pids` spent per 1,000 answered requests
    (estimated from DATA bytes when `ok_frame_bytes` is given, so refusals do not dilute it)."""
    before = cpu_ticks(pids)
    r = answered(h2load(address, method, body, concurrency, seconds, workdir), ok_frame_bytes)
    spent = cpu_seconds_since(before, pids)
    n = r.get("ok_estimated", r.get("ok"))
    if n:
        r["cpu_s_per_1000"] = round(sum(spent.values()) / n * 1000, 4)
        r["cpu_s_per_1000_by_process"] = {k: round(v / n * 1000, 4) for k, v in spent.items()}
    return r


class Ticks(enum.Enum):
    """How the connections of h2load's rate mode share out its send ticks. Each connection sends the requests
    it is due every max(10 ms, 1/rps) from the moment it connected (nghttp2's `Client::start_rps_timer`), so
    connections opened together tick together: "R requests/s" arrive as 100 bursts a second of R/100 requests
    (250 at 25,000/s). Opened a millisecond apart (`-r 1 --rate-period 1ms`, the finest h2load takes) ten
    connections cover the 10 ms between ticks: a burst of ~R/1,000 each millisecond, nearer an open loop's
    arrivals as Triton's perf_analyzer (a schedule per request) or a Poisson process make them, though still
    burstier than either."""

    ALIGNED = "aligned"  # 4 connections opened at once, run for `seconds` (-D)
    SPREAD = "spread"  # 10 connections opened 1 ms apart, each sending its share of rate x seconds (-n)


SPREAD_CONNS = 10


def start_rate(address: str, method: str, body: bytes, rate: float, seconds: float, workdir: Path,
               conns: int = 4, streams: int = 256, ticks: Ticks = Ticks.ALIGNED) -> tuple[subprocess.Popen, Path]:
    """h2load offering `rate` requests/s in all (`--rps` per connection) for `seconds`, each request's
    status and latency logged; finish it with `rate_result`. A connection whose `streams` are all in
    flight waits, so an overloaded server that neither answers nor refuses caps the offered rate (and a
    SPREAD run, bounded by its request count rather than by time, then lasts longer). `ticks`: see Ticks;
    SPREAD opens SPREAD_CONNS connections with the same streams in all (`conns` x `streams`)."""
    log = workdir / f"h2load-rate-{os.getpid()}.log"
    log.unlink(missing_ok=True)
    if ticks is Ticks.SPREAD:
        streams, conns = max(1, conns * streams // SPREAD_CONNS), SPREAD_CONNS
        cmd = ["h2load", "-n", str(max(conns, round(rate * seconds))), "-r", "1", "--rate-period", "1ms",
               *_rest(address, method, body, workdir, conns, streams)]
    else:
        cmd = _command(address, method, body, workdir, seconds, conns, streams)
    cmd[1:1] = ["--rps", f"{max(rate / conns, 0.01):.2f}", "--log-file", str(log)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log


def rate_result(proc: subprocess.Popen, log: Path, seconds: float, ok_frame_bytes: int) -> dict:
    """The rate run's summary; latency percentiles of every request (answered and refused alike: h2load
    logs HTTP status 200 for both, and times each from its own send, not from its schedule),
    `ok_estimated` from the DATA bytes (see the module docstring), and how bursty the sends were (`sends`:
    the most requests sent in one millisecond, and the share of milliseconds with none sent)."""
    text, _ = proc.communicate(timeout=seconds + 120)
    r = parse(text)
    try:
        rows = np.loadtxt(log, dtype=np.int64, ndmin=2)
    except (OSError, ValueError):
        rows = np.zeros((0, 3), dtype=np.int64)
    if len(rows):
        ms = rows[:, 2] / 1000.0
        r["p50_ms"] = round(float(np.percentile(ms, 50)), 2)
        r["p99_ms"] = round(float(np.percentile(ms, 99)), 2)
        r["http_status"] = {str(s): int(n) for s, n in zip(*np.unique(rows[:, 1], return_counts=True), strict=True)}
        per_ms = np.bincount((rows[:, 0] - rows[:, 0].min()) // 1000)  # requests sent in each millisecond
        r["sends"] = {"busiest_ms": int(per_ms.max()), "empty_ms_share": round(float((per_ms == 0).mean()), 3)}
    log.unlink(missing_ok=True)
    return answered(r, ok_frame_bytes)


def _ms(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return round(float(text[: -len(unit)]) * scale, 3)
    return float(text)


if __name__ == "__main__":  # make install: the benchmarks' (and their tests') load generator
    if (found := ensure_h2load()) is None:
        print("h2load missing (apt-get install nghttp2-client, as root): the gateway benchmarks and "
              "tests/test_gateway_bench.py need it", file=sys.stderr)
    else:
        print(found)
