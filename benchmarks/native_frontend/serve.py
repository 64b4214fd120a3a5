"""Starts the prototype native gateway: the table image, frontend.cc's binary and its Python workers, as
children; prints `{"event": "serving", "port": P}` once every worker is connected; SIGTERM stops them.

    python -m benchmarks.native_frontend.serve --package PKG [--workers 2] [--workdir DIR]
        [--frontend-args "--max-queue-us 20000"]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.native_frontend import build
from protos.process import child_env, stop_all


def image_of(package: str, workdir: Path) -> Path:
    """The package's table image, from shared_tables' own short-lived child (as serve-triton's supervisor
    prepares one), so this process stays small."""
    out = subprocess.run([sys.executable, "-m", "inference_gateway.shared_tables", package, str(workdir / "images")],
                         capture_output=True, text=True, check=False, env=child_env(None))
    facts = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {"error": out.stderr[-2000:]}
    if "error" in facts:
        raise SystemExit(f"native gateway: {package}: {facts['error']}")
    return Path(facts["image"])


def _die_with_parent() -> None:
    """In each child: SIGTERM when this process dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _announced(fe: subprocess.Popen, children: list[subprocess.Popen], timeout: float = 300.0) -> dict:
    """The frontend's next JSON line, failing at once if any child exits first (a worker that cannot load
    would otherwise leave the frontend waiting for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [c.args[0] if c is fe else " ".join(map(str, c.args[-4:])) for c in children if c.poll() is not None]
        if dead:
            raise SystemExit(f"native gateway: {dead[0]} exited before serving")
        if select.select([fe.stdout], [], [], 0.2)[0]:
            return json.loads(fe.stdout.readline())
    raise SystemExit(f"native gateway: not serving within {timeout} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default="native-gateway")
    p.add_argument("--frontend-args", default="--max-queue-us 20000",
                   help="frontend.cc's batcher and admission flags (--max-batch, --max-batch-bytes, --max-delay-us, "
                   "--max-queue-us, --cost-us, --cost-ns-per-byte: its header says what each does)")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    binary = build()
    image = image_of(args.package, work)
    sock = work / "workers.sock"
    fe = subprocess.Popen([str(binary), "--socket", str(sock), "--workers", str(args.workers),
                           *args.frontend_args.split()], stdout=subprocess.PIPE, text=True,
                          preexec_fn=_die_with_parent)
    children = [fe]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        _announced(fe, children)  # listening for workers
        children += [subprocess.Popen([sys.executable, "-m", "benchmarks.native_frontend.worker", str(sock),
                                       args.package, str(image)], env=child_env(None), preexec_fn=_die_with_parent)
                     for _ in range(args.workers)]
        port = _announced(fe, children)["port"]
        print(json.dumps({"event": "serving", "port": port, "frontend_pid": fe.pid,
                          "worker_pids": [c.pid for c in children[1:]]}), flush=True)
        while not stop.wait(0.5):
            if any(c.poll() is not None for c in children):
                print(json.dumps({"event": "child_exited"}), flush=True)
                return 1
        return 0
    finally:
        stop_all(children, 10)


if __name__ == "__main__":
    raise SystemExit(main())
