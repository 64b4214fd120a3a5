"""The gateway benchmark's own arithmetic: h2load's summary and rate log read right, refusals told from
answers by DATA bytes (h2load reports HTTP 200 for both), issue 12's targets judged with the bounds'
direction, the native probe (probe.cc) sending on schedule and telling answers from refusals, and an open-loop
phase saying how the cores were shared between the load generator and the server, and h2load's send ticks
spread over its 10 ms when asked."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import grpc
import pytest

from benchmarks.gateway_load import Run, rate_phase, targets
from benchmarks.h2 import TICK, Ticks, ensure_h2load, parse, rate_result, start_rate, steal_s
from benchmarks.h2_floor import SERVERS, start_servers
from benchmarks.native_floor import start_binary
from benchmarks.probe import open_loop
from benchmarks.probe import parse as parse_probe
from inference_gateway.loadgen import METHOD
from inference_gateway.native.build import build
from protos.process import free_port, stop_all

SUMMARY = """finished in 3.00s, 5201.67 req/s, 1.02MB/s
requests: 15605 total, 15605 started, 15605 done, 15605 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 15605 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 3.05MB (3196453) total, 170.90KB (175003) headers (space savings 91.64%), 76.20KB (78025) data
                     min         max         mean         sd        +/- sd
time for request:      1.23ms     20.88ms     12.27ms      2.10ms    70.00%
"""


def test_parse_reads_rate_counts_data_bytes_and_latency():
    r = parse(SUMMARY)
    assert r["requests_per_s"] == 5201.67 and r["ok"] == 15605 and r["failed"] == 0
    assert r["data_bytes"] == 78025 and r["seconds"] == 3.0
    assert r["mean_ms"] == 12.27 and r["max_ms"] == 20.88
    assert "error" in parse("connect: Connection refused")


def test_rate_result_estimates_answers_from_data_and_reads_the_log(tmp_path: Path):
    # 10 streams done, 4 of them answered with a 20-byte frame (80 DATA bytes): 6 refused (trailers only)
    text = SUMMARY.replace("15605 done, 15605 succeeded", "10 done, 10 succeeded").replace("(78025) data", "(80) data")
    log = tmp_path / "rate.log"
    log.write_text("".join(f"{1000 + i}\t200\t{(i + 1) * 1000}\n" for i in range(10)))
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(text)
    proc.stdin.close()
    proc.stdin = None  # communicate() only reads
    r = rate_result(proc, log, 3.0, ok_frame_bytes=20)
    assert r["ok_estimated"] == 4 and r["refused_estimated"] == 6 and r["answered_per_s"] == 1.3
    assert r["http_status"] == {"200": 10}
    assert 5.0 <= r["p50_ms"] <= 6.0 and 9.0 <= r["p99_ms"] <= 10.0
    assert not log.exists()


def test_targets_judge_each_bound_in_its_direction():
    run = Run(argparse.Namespace(), Path("."), set(), True, {"python": 1000.0, "h2load": 2000.0,
                                                              "cpu_s_per_1000": 0.3}, {})
    run.figures["serve-triton", "int8"] = {"w1_python_per_s": 1600.0, "w1_h2load_per_s": 3000.0,
                                           "cpu_s_per_1000": 0.2, "half_p99_ms": 12.0,
                                           "overload_refusal_p99_ms": 7.5, "half_aligned_p99_ms": 16.0,
                                           "overload_aligned_goodput_vs_max": 0.95}
    t = targets(run)["serve-triton/int8"]
    assert t["w1_vs_echo_python"] == {"value": 1.6, "min": 1.5, "pass": True}
    assert t["w1_vs_echo_h2load"]["pass"] is False  # 1.5x < 2x
    assert t["cpu_vs_echo"]["value"] == 0.667 and t["cpu_vs_echo"]["pass"] is False
    assert t["half_p99_ms"]["pass"] is True and t["overload_refusal_p99_ms"]["pass"] is False
    assert t["w2_vs_in_process_2t"] == {"value": None, "min": 0.8, "pass": None}  # not measured: no verdict
    # h2load's aligned ticks, reported beside the target with its bound and direction, not as one
    assert t["half_aligned_p99_ms"] == {"value": 16.0, "max": 15.0, "pass": False, "target": False}
    assert t["overload_aligned_goodput_vs_max"] == {"value": 0.95, "min": 0.9, "pass": True, "target": False}
    assert "overload_aligned_refusal_p99_ms" not in t  # not measured: not reported


def test_probe_output_is_read_into_open_loops_record():
    # 5 calls sent in 1 s; the last answer 2 s after the start (a queue drained): rates over the 2 s
    out = ("sent 1000000 2000000\n0 2000 \n8 1000 overloaded: expected queue wait 31 ms exceeds max_queue_wait_ms 20\n"
           "0 4000 \n8 3000 Concurrent RPC limit exceeded\n3 500 dense: NaN in sample 0\n")
    r = parse_probe(out, 5.0, 1.0, 1)
    assert r["ok"] == 2 and r["requests_per_s"] == 1.0 and r["achieved_send_rate"] == 5.0
    assert r["errors"] == {"RESOURCE_EXHAUSTED:admission": 1, "RESOURCE_EXHAUSTED:rpc_limit": 1,
                           "INVALID_ARGUMENT": 1}
    assert r["reject_ms_by_code"]["RESOURCE_EXHAUSTED:admission"] == {"p50": 1.0, "p99": 1.0}
    assert 2.9 < r["reject_p99_ms"] <= 3.0  # refusals only: the INVALID_ARGUMENT is an error, not a refusal
    assert r["rejected_share"] == 0.4 and r["client"] == "native_probe"
    with pytest.raises(ValueError, match="unexpected output"):
        parse_probe("usage: probe ...", 5.0, 1.0, 1)


def test_probe_sends_on_schedule_and_times_answers_and_refusals(tmp_path: Path):
    echo, port = start_binary([str(build()), "--echo"], tmp_path, 30)
    try:
        r = open_loop(f"127.0.0.1:{port}", METHOD, [b"", b"\x0a\x01x"], 400.0, 1.0, 1)
        assert r["ok"] == 400 and r["errors"] == {} and 390 <= r["achieved_send_rate"] <= 410
        assert 380 <= r["requests_per_s"] <= 410 and r["p50_ms"] < 50
    finally:
        stop_all([echo], 10)
    # nobody listens: every call fails UNAVAILABLE, counted and timed as a refusal
    r = open_loop(f"127.0.0.1:{free_port()}", METHOD, [b""], 50.0, 1.0, 1, timeout_s=2.0)
    assert r["ok"] == 0 and r["errors"] == {"UNAVAILABLE": 50} and r["rejected_share"] == 1.0
    assert r["reject_ms_by_code"]["UNAVAILABLE"]["p99"] < 2500


def test_steal_is_procs_steal_column_in_seconds():
    """proc(5): cpu user nice system idle iowait irq softirq steal ...; steal_s reads the 8th, in seconds."""
    first = steal_s()
    with open("/proc/stat") as f:
        ticks = int(f.readline().split()[8])
    assert first == pytest.approx(ticks / TICK, abs=0.05) and 0 <= first <= steal_s()


def test_an_open_loop_phase_says_how_the_cores_were_shared(tmp_path: Path):
    """rate_phase's `sent_per_s` (what h2load and the probe sent: an overloaded server can cap it below the
    offer) and `cores`: CPU-seconds per second of the load generator (h2load and the probe, this
    process's waited-for children) and of the server's processes, here the native echo at 2,000 requests/s
    (a few hundredths of a core each; a unit slip would read 100x, a missed wait 0), and the steal."""
    assert ensure_h2load(), "h2load is missing: apt-get install nghttp2-client (done here when run as root)"
    echo, port = start_binary([str(build()), "--echo"], tmp_path, 30)
    try:
        run = Run(argparse.Namespace(seconds=2.0), tmp_path, set(), True, {}, {})
        r = rate_phase(run, f"127.0.0.1:{port}", METHOD, [b""], 2000.0, [echo.pid])
    finally:
        stop_all([echo], 10)
    assert 1700 <= r["goodput_per_s"] <= 2100, r  # the echo answers every call
    assert 1700 <= r["sent_per_s"] <= 2100 and r["offered_per_s"] == 2000.0, r  # all of the offer sent
    assert r["probe"]["ok"] > 0 and r["probe"]["errors"] == {}, r["probe"]
    assert 0 < r["cores"]["generator"] < 1.5 and 0 < r["cores"]["server"] < 1.5, r["cores"]
    assert 0 <= r["cores"]["steal"] < 1.0, r["cores"]  # the hypervisor's share of the phase (0 on bare metal)
    assert sum(r["cores"]["server_by_process"].values()) == pytest.approx(r["cores"]["server"], abs=0.02)


def test_spread_ticks_send_every_millisecond_where_aligned_ones_send_in_bursts(tmp_path: Path):
    """h2load's rate mode sends each connection's due requests every 10 ms from when it connected: with its
    connections opened together (ALIGNED) 2,000 calls/s arrive as ~100 bursts of ~20 and ~90% of milliseconds
    send nothing; opened 1 ms apart (SPREAD) a few go in most milliseconds. Both send the whole offer."""
    assert ensure_h2load(), "h2load is missing: apt-get install nghttp2-client (done here when run as root)"
    echo, port = start_binary([str(build()), "--echo"], tmp_path, 30)
    try:
        runs = {}
        for ticks in Ticks:
            proc, log = start_rate(f"127.0.0.1:{port}", METHOD, b"", 2000.0, 2.0, tmp_path, ticks=ticks)
            runs[ticks] = rate_result(proc, log, 2.0, 0)
    finally:
        stop_all([echo], 10)
    aligned, spread = runs[Ticks.ALIGNED], runs[Ticks.SPREAD]
    for r in (aligned, spread):
        assert 3600 <= r["ok"] <= 4100 and r["failed"] == 0, r
    assert aligned["sends"]["empty_ms_share"] >= 0.75 and aligned["sends"]["busiest_ms"] >= 15, aligned
    assert spread["sends"]["empty_ms_share"] <= 0.5, spread  # ~0.3: connects land near, not on, each 1 ms
    assert spread["sends"]["busiest_ms"] * 2 <= aligned["sends"]["busiest_ms"], (spread, aligned)


def test_h2_floor_runs_the_frontend_on_both_engines_answering_and_refusing(tmp_path: Path):
    """benchmarks.h2_floor's servers are the frontend on grpc++ and on nghttp2, each answering every call OK at
    once (--echo) or refusing it at arrival (no worker: UNAVAILABLE, trailers only), as grpcio reads them; the
    _tls ones (--tls) over TLS with the certificate it made, refusing plaintext."""
    names = [*SERVERS, *(f"{s}_tls" for s in SERVERS)]
    servers, procs = start_servers(tmp_path, names)
    try:
        assert sorted(servers) == sorted(names) and len(names) == 8
        creds = grpc.ssl_channel_credentials((tmp_path / "floor.crt").read_bytes())
        for name, (address, pid) in servers.items():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[cmdline.index(b"--engine") + 1].decode() == name.split("_")[0]
            if name.endswith("_tls"):
                address = address.removeprefix("https://")
                with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError) as e:
                    plain.unary_unary(METHOD)(b"\x0a\x01x", timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "no worker" not in e.value.details(), name
            secure = name.endswith("_tls")
            with grpc.secure_channel(address, creds) if secure else grpc.insecure_channel(address) as channel:
                call = channel.unary_unary(METHOD)
                if name.split("_")[1] == "echo":
                    assert call(b"\x0a\x01x", timeout=10) == b"", name
                    continue
                with pytest.raises(grpc.RpcError) as refused:
                    call(b"\x0a\x01x", timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, name
                assert "no worker" in refused.value.details(), name
    finally:
        stop_all(procs, 10)
