"""Log hygiene (issue 11, item 5): undecodable and rejected requests are counted in
`rpc_rejected_total` and logged at most once per interval, never with a traceback each."""

from __future__ import annotations

import logging
import re

import grpc

from coordinator.process import launch as launch_coordinator
from inference_gateway.process import launch as launch_gateway
from protos.rejects import RateLimitedLog
from tests import prom
from tests.test_confined_paths import TABLES
from tests.test_credentials import store  # noqa: F401 - the module-scoped model store fixture

GARBAGE = b"\x0a\x10ab"  # a length-delimited field longer than the message: "Wire format was corrupt"
N = 200


def send_garbage(address: str, method: str, n: int = N, streaming_response: bool = False) -> set[grpc.StatusCode]:
    codes = set()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(method) if streaming_response else channel.unary_unary(method)
        for _ in range(n):
            try:
                out = call(GARBAGE, timeout=10)
                if streaming_response:
                    list(out)
                codes.add(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.add(e.code())
                assert "malformed" in (e.details() or ""), e.details()
    return codes


def assert_quiet(log: str, method: str) -> None:
    assert "Traceback" not in log
    assert "Exception deserializing" not in log
    lines = [line for line in log.splitlines() if "rejected undecodable request" in line and method in line]
    assert 1 <= len(lines) <= 3, lines  # once per interval, with the count of the suppressed ones


def test_rate_limited_log_logs_once_per_interval(caplog):
    log = RateLimitedLog(logging.getLogger("test.rejects"), interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="test.rejects"):
        assert log.log("k", "bad request %d", 1)
        assert not any(log.log("k", "bad request %d", i) for i in range(2, 100))
        assert log.log("other", "another kind")
    assert [r.getMessage() for r in caplog.records] == ["bad request 1", "another kind"]
    assert all(r.exc_info is None for r in caplog.records)


def test_shard_counts_undecodable_requests_without_a_traceback_each(shard_factory):
    proc, client = shard_factory({"tables": TABLES, "shard_id": 0, "plan_version": 0})
    svc = "/recsys.v1.EmbeddingShard"
    assert send_garbage(proc.address, f"{svc}/Checkpoint") == {grpc.StatusCode.INVALID_ARGUMENT}
    assert send_garbage(proc.address, f"{svc}/Lookup") == {grpc.StatusCode.INVALID_ARGUMENT}  # hand-framed
    assert send_garbage(proc.address, f"{svc}/ExportRows", 20, streaming_response=True) == \
        {grpc.StatusCode.INVALID_ARGUMENT}
    for method, n in (("Checkpoint", N), ("Lookup", N), ("ExportRows", 20)):
        assert prom.value(proc.metrics_port, "rpc_rejected_total", method=f"{svc}/{method}",
                      reason="undecodable") == n, method
    assert client.info().shard_id == 0  # still serving
    log = proc.log_path.read_text()
    assert_quiet(log, "Checkpoint")
    assert_quiet(log, "Lookup")
    assert not re.search(r"ERROR", log), log[-2000:]


def test_gateway_and_coordinator_count_undecodable_requests(store, tmp_path):  # noqa: F811
    gw = launch_gateway(["--model-store", str(store), "--model", "v1"], workdir=tmp_path / "gw")
    coord = launch_coordinator([], workdir=tmp_path / "coord")
    try:
        method = "/recsys.v1.InferenceGateway/Predict"
        assert send_garbage(gw.address, method) == {grpc.StatusCode.INVALID_ARGUMENT}
        assert prom.value(gw.metrics_port, "rpc_rejected_total", method=method, reason="undecodable") == N
        assert_quiet(gw.log_text(), "Predict")
        method = "/recsys.v1.Coordinator/ListMembers"
        assert send_garbage(coord.address, method) == {grpc.StatusCode.INVALID_ARGUMENT}
        assert prom.value(coord.metrics_port, "rpc_rejected_total", method=method, reason="undecodable") == N
        assert_quiet(coord.log_tail(1 << 20), "ListMembers")
    finally:
        gw.kill()
        coord.kill()
