"""A batch holding both expired and live requests: the expired are answered Expired, the live are
scored, and the worker survives to take the next batch (gateway_load's 2x overload found a batch like
this raising ValueError from Pending's field-wise ==, which killed both workers and hung `serve`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch

from inference_gateway.batching import Batcher, BatchingConfig, Expired, Pending
from inference_gateway.client import build_request
from inference_gateway.model import ServingModel
from inference_gateway.requests import Limits, decode
from protos.model_config import ModelConfig
from protos.package import load_package
from trainer.data import SyntheticData
from trainer.export import ExportedModel, export_package, table_dtypes
from trainer.model import DenseDLRM

ROOT = Path(__file__).resolve().parent.parent


def test_expired_and_live_in_one_batch_keep_the_worker_alive(tmp_path):
    cfg = ModelConfig.load(ROOT / "configs" / "tiny.yaml")
    g = torch.Generator().manual_seed(0)
    exported = ExportedModel(cfg, DenseDLRM(cfg), {t.name: torch.randn(t.num_rows, t.dim, generator=g)
                                                   for t in cfg.tables}, step=0)
    model = ServingModel(load_package(export_package(exported, tmp_path / "pkg", dtypes=table_dtypes(cfg, "fp32", []))))
    delivered: dict[int, object] = {}
    done = threading.Event()

    def deliver(pairs) -> None:
        for token, result in pairs:
            delivered[token] = result
        if len(delivered) >= 6:
            done.set()

    batcher = Batcher(model, BatchingConfig(max_batch_size=1024, max_wait_s=0.2, max_queue_samples=1 << 20,
                                            workers=1), deliver)
    try:
        def pending(i: int, deadline: float | None) -> Pending:
            b = SyntheticData(cfg, seed=1, pooling_factor=2).batch(i, 4)
            req = build_request(b.dense.numpy(), b.sparse.lengths.numpy(), b.sparse.values.numpy())
            return Pending(decode(req, model, Limits()), deadline, i)

        past = time.monotonic() - 1
        for i in range(4):  # one batch: expired and live interleaved
            batcher.submit(pending(i, past if i % 2 else None))
        time.sleep(0.5)
        for i in (4, 5):  # a next batch: only a live worker answers it
            batcher.submit(pending(i, None))
        assert done.wait(30), f"answered only {sorted(delivered)}"
        assert all(isinstance(delivered[i], Expired) for i in (1, 3))
        assert all(len(delivered[i]) == 4 and bool(np.isfinite(np.asarray(delivered[i])).all()) for i in (0, 2, 4, 5))
    finally:
        batcher.close(10)
