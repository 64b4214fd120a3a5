"""Starts the prototype native gateway: the table image, frontend.cc's binary and its Python workers, as
children; prints `{"event": "serving", "port": P}` once every worker is connected; SIGTERM stops them.

    python -m benchmarks.native_frontend.serve --package PKG [--workers 2] [--workdir DIR]
        [--frontend-args "--max-queue-us 20000"]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

from benchmarks.native_frontend import build
from protos.process import child_env


def image_of(package: str, workdir: Path) -> Path:
    """The package's table image (shared_tables' own writer, in a child so this process stays small)."""
    code = ("import sys; from inference_gateway.package import load_package; "
            "from inference_gateway.shared_tables import write_image; "
            "print(write_image(load_package(sys.argv[1]), sys.argv[2]))")
    out = subprocess.run([sys.executable, "-c", code, package, str(workdir / "images")], capture_output=True,
                         text=True, check=True, env=child_env(None))
    return Path(out.stdout.strip().splitlines()[-1])


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
                           *args.frontend_args.split()], stdout=subprocess.PIPE, text=True)
    children = [fe]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        json.loads(fe.stdout.readline())  # listening for workers
        children += [subprocess.Popen([sys.executable, "-m", "benchmarks.native_frontend.worker", str(sock),
                                       args.package, str(image)], env=child_env(None)) for _ in range(args.workers)]
        port = json.loads(fe.stdout.readline())["port"]
        print(json.dumps({"event": "serving", "port": port, "frontend_pid": fe.pid,
                          "worker_pids": [c.pid for c in children[1:]]}), flush=True)
        while not stop.wait(0.5):
            if any(c.poll() is not None for c in children):
                print(json.dumps({"event": "child_exited"}), flush=True)
                return 1
        return 0
    finally:
        for c in children:
            c.terminate()
        for c in children:
            try:
                c.wait(10)
            except subprocess.TimeoutExpired:
                c.kill()


if __name__ == "__main__":
    raise SystemExit(main())
