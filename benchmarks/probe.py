"""The native open-loop probe (probe.cc, compiled on first use like serve-native's frontend): the figures of
`inference_gateway.loadgen.open_loop` (accepted p50/p99, each refusal code and how fast it came), timed by
a grpc++ client instead of a Python event loop that runs late when h2load and the gateway fill the cores.

    from benchmarks.probe import open_loop
    open_loop("127.0.0.1:50051", METHOD, pool, rate=100, seconds=5, batch=1)
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from inference_gateway.loadgen import REFUSALS, refusal_label, stats
from inference_gateway.native.build import build
from protos.channels import STATUS_BY_NUMBER

SOURCE = Path(__file__).resolve().parent / "probe.cc"


def binary() -> Path:
    return build(source=SOURCE, library="grpc++")


def parse(text: str, offered: float, seconds: float, batch: int) -> dict:
    """probe.cc's output -> open_loop's record: latencies from each call's schedule, refusals named by who
    refused (`refusal_label`), rates over the time from the start to the last answer (as open_loop's)."""
    lines = text.split("\n")
    head = lines[0].split()
    if len(head) != 3 or head[0] != "sent":
        raise ValueError(f"probe: unexpected output {text[:200]!r}")
    sent_for, done = int(head[1]) / 1e6, int(head[2]) / 1e6
    lat: list[float] = []
    errors: dict[str, int] = {}
    refused: dict[str, list[float]] = {}
    for line in lines[1:]:
        if not line:
            continue
        number, us, details = [*line.split(" ", 2), ""][:3]
        code = STATUS_BY_NUMBER.get(int(number), grpc.StatusCode.UNKNOWN)
        if code == grpc.StatusCode.OK:
            lat.append(int(us) / 1e6)
            continue
        name = refusal_label(code, details)
        errors[name] = errors.get(name, 0) + 1
        if code in REFUSALS:
            refused.setdefault(name, []).append(int(us) / 1e6)
    total = len(lat) + sum(errors.values())
    out = {**stats(lat, errors, max(done, 1e-9), batch), "client": "native_probe",
           "offered_per_s": round(offered, 1), "achieved_send_rate": round(total / max(sent_for, 1e-9), 1)}
    every = np.asarray([x for v in refused.values() for x in v]) * 1000
    if every.size:
        out["reject_p99_ms"] = round(float(np.percentile(every, 99)), 2)
        out["reject_ms_by_code"] = {name: {"p50": round(float(np.percentile(np.asarray(v) * 1000, 50)), 2),
                                           "p99": round(float(np.percentile(np.asarray(v) * 1000, 99)), 2)}
                                    for name, v in refused.items()}
    out["rejected_share"] = round(every.size / max(total, 1), 3)
    return out


@dataclass
class Probe:
    """A probe running beside other load (h2load); `result` waits for it."""

    proc: subprocess.Popen
    bodies: Path
    rate: float
    seconds: float
    batch: int
    timeout_s: float

    @classmethod
    def start(cls, address: str, method: str, pool: list[bytes], rate: float, seconds: float, batch: int,
              timeout_s: float = 10.0) -> Probe:
        """Call i sends pool[i % len(pool)] at start + i / rate, with a deadline of timeout_s."""
        exe = binary()  # BuildError (what to install) before anything is written
        with tempfile.NamedTemporaryFile("wb", suffix=".bodies", delete=False) as f:
            for body in pool:
                f.write(struct.pack("<I", len(body)) + body)
        cmd = [str(exe), address, method, f.name, f"{float(rate):.9g}", f"{float(seconds):.9g}",
               str(max(1, round(timeout_s * 1000)))]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return cls(proc, Path(f.name), rate, seconds, batch, timeout_s)

    def result(self) -> dict:
        try:
            out, err = self.proc.communicate(timeout=self.seconds + self.timeout_s + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        finally:
            self.bodies.unlink(missing_ok=True)
        if self.proc.returncode != 0:
            raise RuntimeError(f"probe exited {self.proc.returncode}: {err.strip()[-500:]}")
        return parse(out, self.rate, self.seconds, self.batch)


def open_loop(address: str, method: str, pool: list[bytes], rate: float, seconds: float, batch: int,
              timeout_s: float = 10.0) -> dict:
    return Probe.start(address, method, pool, rate, seconds, batch, timeout_s).result()
