"""Online freshness for serve-triton: one process that follows the shards' deltas into a shared table image.

serve-triton's workers map a version's table image read-only; with `--follow` the supervisor gives the
newest version of the followed model a private copy of its image plus a state file (shared_tables
.ImageState) and runs this process beside tritonserver. It maps that copy writable and runs `serve`'s own
DeltaFollower over it: rows are quantized and written in place under the state's sequence lock (workers
look up again when a write overlapped their lookup), a dense publish is saved beside the image and its
version bumped (workers load it before their next batch), and on a gap it rewrites the image from the
newest snapshot package under `--snapshots`. What it has applied and where it stands in the streams go
to `<image>.follow.json` after every read that applied something: ListModels' applied_steps on the
management port, and the position a restarted follower continues from (neither replaying the streams
nor resynchronising); its Prometheus metrics (`delta_lag_seconds`,
`delta_applied_step`, `delta_gaps_total`, ... as `serve --follow` exports them) on `--metrics-port`.

    python -m inference_gateway.image_follower --package PKG --image IMAGE --redis URL [--namespace recsys]
        [--snapshots DIR] [--metrics-port PORT (-1: none)]

The supervisor starts it (and again if it dies); torch and fbgemm live here, not in the supervisor.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import threading
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from inference_gateway.follower import DeltaFollower, FollowSettings
from inference_gateway.freshness import newest_snapshot, snapshot_step
from inference_gateway.image_state import follow_path
from inference_gateway.model import ServingModel
from protos.metrics import serve_metrics
from protos.package import PackageError, load_package

log = logging.getLogger("inference_gateway.image_follower")


class ImageFollower:
    """The writer of one followed image: `model` maps it writable; `resync` rewrites it from a snapshot."""

    def __init__(self, package: str, image: str, settings: FollowSettings, snapshots: str | None,
                 registry: CollectorRegistry) -> None:
        torch.set_num_threads(1)
        self.image, self.snapshots = Path(image), Path(snapshots) if snapshots else None
        self.model = ServingModel(load_package(package, read_tables=False), table_image=image, writer=True)
        if self.model.state is not None and self.model.state.recover():
            log.warning("the last writer of %s died mid-write: its rows are written again from the streams", image)
        self.follower = DeltaFollower(settings, lambda: self.model, self.resync, registry, on_applied=self.save)
        self._resume()

    def _resume(self) -> None:
        """From the position an earlier follower of this image saved, if any (the supervisor removes it
        with a fresh image)."""
        try:
            saved = json.loads(follow_path(self.image).read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("%s unreadable (%s): following from the package's step", follow_path(self.image), e)
            return
        try:
            self.follower.resume(saved["position"])
        except (KeyError, TypeError, ValueError) as e:
            log.warning("the saved position does not fit (%s): following from the package's step", e)
            return
        log.info("continuing from the saved position (snapshot step %d)", self.follower.base)

    def resync(self) -> ServingModel | None:
        """The newest snapshot past what is served, written over the image (same tables and layout only)."""
        path = newest_snapshot(self.snapshots) if self.snapshots else None
        if path is None or snapshot_step(path) <= self.follower.base:
            return None
        try:
            pkg = load_package(path)
        except PackageError as e:
            log.error("resync: snapshot %s refused: %s", path, e)
            return None
        def layout(tables: dict) -> list:  # the image's table order and shapes: offsets follow from them
            return [(n, t.num_rows, t.dim, t.dtype) for n, t in tables.items()]

        if layout(pkg.tables) != layout(self.model.package.tables):
            log.error("resync: snapshot %s has other tables (or another order) than the served version; load it "
                      "as a new version", path)
            return None
        for name, spec in pkg.tables.items():  # a table a write: workers wait for one table's copy at most
            with self.model.write_rows(), torch.no_grad():
                self.model.rows(name)[:, : spec.row_bytes] = pkg.rows[name]
        model = ServingModel(load_package(path, read_tables=False), table_image=self.image, writer=True)
        model.swap_dense(pkg.dense)  # the snapshot's dense arch, to every worker
        self.model = model
        log.info("resync: image rewritten from %s (step %d)", path, snapshot_step(path))
        return model

    def save(self) -> None:
        """Applied steps (ListModels) and the stream position, after the rows they describe are in the image
        (tmp + rename: a reader never sees half a file; a follower killed before it re-applies those
        entries, which write the same rows again)."""
        out = follow_path(self.image)
        tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
        tmp.write_text(json.dumps({"applied_steps": self.model.applied_steps, "position": self.follower.position()}))
        os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference_gateway.image_follower", description=__doc__.split("\n")[0])
    p.add_argument("--package", required=True, help="the followed version's package directory")
    p.add_argument("--image", required=True, help="its private table image (a state file beside it)")
    p.add_argument("--redis", required=True, help="the Redis the shards publish their deltas to")
    p.add_argument("--namespace", default="recsys", help="the deltas' key namespace (the shards' publish_deltas)")
    p.add_argument("--snapshots", help="packages exported from checkpoints: what a gap resynchronises from")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=-1, help="Prometheus /metrics port (0: a free one; -1: none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    registry = CollectorRegistry()
    follower = ImageFollower(args.package, args.image, FollowSettings(args.redis, args.namespace), args.snapshots,
                             registry)
    metrics_port = serve_metrics(registry, args.metrics_host, args.metrics_port) if args.metrics_port >= 0 else None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"event": "following", "image": args.image, "redis": args.redis,
                      "metrics_port": metrics_port}), flush=True)
    follower.save()
    follower.follower.start()  # DeltaFollower's own loop: retries, Redis errors counted, save() after each apply
    while not stop.wait(1.0):  # woken by SIGTERM / SIGINT
        pass
    follower.follower.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
