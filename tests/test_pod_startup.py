"""What the containers do before they serve: a trainer waits for rendezvous (real sockets on loopback,
a port that starts listening late, a name that does not resolve); a shard takes its id from its pod's
hostname; a restarted trainer resumes only when a checkpoint exists."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from embedding_service.cli import build_parser as shard_parser
from embedding_service.cli import config_from_args
from embedding_service.identity import ordinal_from_hostname
from trainer.rendezvous import Endpoint, RendezvousTimeout, parse_endpoint, probe, wait_rendezvous

UNRESOLVABLE = "trainer-0.no-such-service.invalid"  # .invalid never resolves (RFC 2606)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen_later(port: int, delay_s: float, stop: threading.Event) -> threading.Thread:
    """Binds `port` only after `delay_s`, as torchrun's store does after its pod's DNS name already resolves."""

    def run() -> None:
        time.sleep(delay_s)
        with socket.socket() as srv:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", port))
            srv.listen()
            srv.settimeout(0.1)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    srv.accept()[0].close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_waits_for_a_port_that_listens_late():
    port, coord_port, stop = _free_port(), _free_port(), threading.Event()
    assert probe(Endpoint("127.0.0.1", port)) is not None  # nothing listens yet
    _listen_later(port, 1.0, stop)
    _listen_later(coord_port, 0.0, stop)
    try:
        t0 = time.monotonic()
        wait_rendezvous(Endpoint("localhost", port), rank=1, coordinator=Endpoint("127.0.0.1", coord_port),
                        timeout_s=20, poll_s=0.1)
        waited = time.monotonic() - t0
    finally:
        stop.set()
    assert 0.9 <= waited < 10  # it really waited for the late listener, and returned once it listened


def test_a_closed_port_times_out_naming_the_connect_step():
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(RendezvousTimeout) as e:
        wait_rendezvous(Endpoint("127.0.0.1", port), rank=1, coordinator=None, timeout_s=1.0, poll_s=0.1)
    assert 0.9 <= time.monotonic() - t0 < 5
    assert f"127.0.0.1:{port}" in str(e.value) and "does not accept connections" in str(e.value)


def test_dns_that_fails_times_out_naming_the_dns_step():
    with pytest.raises(RendezvousTimeout) as e:
        wait_rendezvous(Endpoint(UNRESOLVABLE, 29500), rank=1, coordinator=None, timeout_s=0.5, poll_s=0.1)
    assert "does not resolve" in str(e.value) and UNRESOLVABLE in str(e.value)


def test_rank_0_needs_only_its_name_but_every_rank_needs_the_coordinator():
    closed = _free_port()
    # rank 0 hosts the rendezvous store itself: its own port not listening yet is fine
    wait_rendezvous(Endpoint("127.0.0.1", closed), rank=0, coordinator=None, timeout_s=1.0)
    with pytest.raises(RendezvousTimeout, match="does not accept"):
        wait_rendezvous(Endpoint("127.0.0.1", closed), rank=0, coordinator=Endpoint("127.0.0.1", closed),
                        timeout_s=0.5, poll_s=0.1)


def test_wait_rendezvous_cli_exit_codes():
    port, stop = _free_port(), threading.Event()
    cmd = [sys.executable, "-m", "trainer.cli", "wait-rendezvous", "--host", "127.0.0.1", "--port", str(port),
           "--coordinator", f"127.0.0.1:{port}", "--timeout-s", "1"]
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"JOB_COMPLETION_INDEX": "1",
                                                                                  "PATH": "/usr/bin:/bin"})
    assert failed.returncode == 1 and "does not accept connections" in failed.stderr
    _listen_later(port, 0.0, stop)
    try:
        ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"JOB_COMPLETION_INDEX": "1",
                                                                                  "PATH": "/usr/bin:/bin"})
    finally:
        stop.set()
    assert ok.returncode == 0, ok.stderr


def test_parse_endpoint():
    assert parse_endpoint("coordinator:50050") == Endpoint("coordinator", 50050)
    assert parse_endpoint("[::1]:50050") == Endpoint("::1", 50050)
    for bad in ("coordinator", "coordinator:", ":50050", "h:p"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_shard_id_from_statefulset_hostname(monkeypatch, tmp_path):
    assert ordinal_from_hostname("embedding-shard-0") == 0
    assert ordinal_from_hostname("embedding-shard-12") == 12
    with pytest.raises(ValueError, match="does not end in -N"):
        ordinal_from_hostname("embedding-shard")
    monkeypatch.setenv("HOSTNAME", "embedding-shard-3")
    args = shard_parser().parse_args(["serve", "--standby", "--shard-id-from-hostname"])
    assert config_from_args(args).assignment.shard_id == 3
    # a per-shard config file picked by the ordinal (the gpu overlay's collective shards)
    table = {"name": "t", "num_rows": 10, "dim": 4, "features": ["f"]}
    (tmp_path / "shard-3.json").write_text(json.dumps({"tables": [table]}))
    args = shard_parser().parse_args(["serve", "--config", str(tmp_path / "shard-{shard_id}.json"),
                                      "--shard-id-from-hostname"])
    config = config_from_args(args)
    assert config.assignment.shard_id == 3 and config.assignment.tables[0].name == "t"
    monkeypatch.setenv("HOSTNAME", "shard")
    with pytest.raises(ValueError, match="does not end in -N"):
        config_from_args(shard_parser().parse_args(["serve", "--standby", "--shard-id-from-hostname"]))


def test_a_restarted_trainer_pod_resumes_only_when_a_checkpoint_exists(tmp_path):
    """The Job's pods run one command for the first start and every restart: --resume-if-present starts
    fresh on an empty checkpoint directory and resumes from LATEST once there is one."""
    from embedding_service.process import launch
    from protos.plan import dump_plan
    from tests.test_trainer_pipeline import PLAN, ROOT, shard_config

    (tmp_path / "plan.json").write_text(dump_plan(PLAN))
    shards = [launch(shard_config(s), workdir=tmp_path / f"shard{s}") for s in range(2)]
    try:
        def train(steps: int) -> dict:
            out = subprocess.run(
                [sys.executable, "-m", "trainer.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                 "--plan", str(tmp_path / "plan.json"), "--shards", ",".join(s.address for s in shards),
                 "--steps", str(steps), "--batch-size", "16", "--checkpoint-dir", str(tmp_path / "ckpt"),
                 "--checkpoint-every", "3", "--resume-if-present", "--json"],
                capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-3000:]
            return [json.loads(ln) for ln in out.stdout.splitlines() if '"event"' in ln][-1]

        first = train(3)  # nothing to resume: starts at step 0, checkpoints step 2
        assert (first["steps"], first["last_step"]) == (3, 2)
        assert (tmp_path / "ckpt" / "LATEST").read_text() == "step-2"
        again = train(5)  # the "restarted pod": resumes after step 2 and runs the rest
        assert (again["steps"], again["last_step"]) == (2, 4)
    finally:
        for s in shards:
            s.kill()


JOIN_GROUP = """
import sys, torch, torch.distributed as dist
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2)
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print("sum", t.item(), flush=True)
dist.destroy_process_group()
"""


def test_a_process_outside_torchrun_joins_its_group_through_master_addr_and_port(tmp_path):
    """The gpu overlay's collective shards are not started by torchrun: they join the trainers' group
    with MASTER_ADDR / MASTER_PORT set to torchrun's --master-addr / --master-port (the store torchrun's
    static rendezvous hosts on node rank 0). Shown with gloo on loopback: rank 0 under torchrun, rank 1
    outside it, one all_reduce."""
    import os

    script = tmp_path / "join.py"
    script.write_text(JOIN_GROUP)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "TORCHELASTIC"))}
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1", "--node-rank=0",
         "--master-addr=127.0.0.1", f"--master-port={port}", "--max-restarts=0", str(script), "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        outside = subprocess.run([sys.executable, str(script), "1"], capture_output=True, text=True, timeout=120,
                                 env=dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
        out, err = torchrun.communicate(timeout=120)
    finally:
        torchrun.kill()
    assert outside.returncode == 0 and torchrun.returncode == 0, outside.stderr[-2000:] + err[-2000:]
    assert "sum 3.0" in outside.stdout and "sum 3.0" in out
