"""A loaded package ready to score: quantized lookups in one IntNBit TBE, then the TorchScript dense arch.

Inputs are the merged batch of many requests, already validated and in package feature order:
dense [B, dense_features] float32, lengths [F * B] feature-major, values (ids), so one TBE call and one
dense forward serve every request of the batch.

Online freshness rewrites rows in place (`apply_rows`) and swaps the dense arch (`swap_dense`): a batch's
lookup holds a read lock and a row write the write lock, so no batch sees a half-written row, and one
entry's rows land together (a batch sees each table at one step or a later one). On a table image shared
by processes (serve-triton --follow) a sequence lock in the image's state file does the same across them
(image_state.ImageState), and the dense arch travels as a file beside the image.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from inference_gateway.image_state import ImageState, dense_path, state_path
from inference_gateway.shared_tables import build_tbe, map_image
from protos.package import Package
from protos.quantize import dequantize_table, quantize_table


class ServingModel:
    def __init__(self, package: Package, device: str = "cpu", table_image: str | Path | None = None,
                 writer: bool = False) -> None:
        """table_image: the package's TBE host buffer written by shared_tables.write_image; mapped
        instead of copying the package's rows (which then need not have been read). With a state file
        beside it the image is followed: `writer` maps it writable to apply deltas (one process), every
        other process reads it under the state's sequence lock."""
        self.package = package
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda requested but torch.cuda.is_available() is False")
        self.name, self.version = package.name, package.version
        self.features = [f.name for f in package.features]
        self.feature_index = {n: i for i, n in enumerate(self.features)}
        self.dense_features = package.dense_features
        # rows of the table each feature looks up, in feature order (validation bounds)
        self.rows_per_feature = np.array([package.tables[f.table].num_rows for f in package.features], dtype=np.int64)
        self.out_of_range = package.out_of_range  # "zero": drop such ids; otherwise refuse the request
        self.tbe = build_tbe(package, self.device)
        self.mapped = None
        self.image = Path(table_image) if table_image is not None else None
        self.state: ImageState | None = None
        if table_image is not None:
            if self.device.type != "cpu":
                raise ValueError("table_image: a shared table image serves CPU workers only")
            if writer and not state_path(table_image).exists():
                raise ValueError(f"table_image: {table_image} has no state file: it is not followed")
            self.mapped = map_image(self.tbe, table_image, writable=writer)  # shared with every other worker
            if state_path(table_image).exists():
                self.state = ImageState(table_image, writable=writer)
        else:
            self.tbe.initialize_weights()
            with torch.no_grad():
                for t, (dest, _) in zip(package.tables.values(), self.tbe.split_embedding_weights(
                        split_scale_shifts=False), strict=True):
                    dest[:, : t.row_bytes].copy_(package.rows[t.name])
        # table -> the TBE's own rows [num_rows, padded row bytes] (online freshness writes them in place)
        self._rows = dict(zip(package.tables, (w for w, _ in self.tbe.split_embedding_weights(
            split_scale_shifts=False)), strict=True))
        self.dense = package.dense.to(self.device)
        self.table_bytes = package.table_bytes
        self.writer = writer
        self._lock = ReadWriteLock()
        self._dense_version = 0  # a followed image's dense arch: the state's version this process serves
        self.applied_steps: dict[str, int] = {}  # online freshness: last step applied per table

    def apply_rows(self, table: str, ids: np.ndarray, rows: np.ndarray, col_offset: int = 0) -> None:
        """Overwrites rows `ids` of `table` (columns from `col_offset`) with float `rows`, quantized to the
        table's dtype. Rows narrower than the table (a column-wise slice) are merged into the served row
        (dequantized, patched, quantized again). ValueError names what does not fit; nothing is written then."""
        spec = self.package.tables.get(table)
        if spec is None:
            raise ValueError(f"table: {table!r} is not in model {self.name!r} v{self.version}")
        idx = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        values = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        n, width = values.shape
        if idx.numel() != n:
            raise ValueError(f"ids: {idx.numel()} ids for {n} rows")
        if n and (int(idx.min()) < 0 or int(idx.max()) >= spec.num_rows):
            raise ValueError(f"ids: out of range [0, {spec.num_rows}) of table {table!r}")
        if col_offset < 0 or col_offset + width > spec.dim:
            raise ValueError(f"columns [{col_offset}, {col_offset + width}) do not fit dim {spec.dim} of {table!r}")
        if self.mapped is not None and not self.writer:
            raise ValueError("a shared read-only table image (a serve-triton worker) takes no deltas: its "
                             "follower process writes them")
        dest = self._rows[table]
        if width != spec.dim:  # a column block: merge it into the current rows
            with self._lock.read():  # (a followed image has one writer, this process)
                current = dest[idx, : spec.row_bytes].clone()
            full = dequantize_table(current, spec.dim, spec.dtype)
            full[:, col_offset : col_offset + width] = values
            values = full
        quantized = quantize_table(values, spec.dtype)
        with self.write_rows(), torch.no_grad():
            dest[idx, : spec.row_bytes] = quantized

    def write_rows(self) -> contextlib.AbstractContextManager:
        """What a row write holds: the sequence lock of a followed image, else the in-process write lock."""
        return self.state.write() if self.state is not None else self._lock.write()

    def rows(self, table: str) -> torch.Tensor:
        """The TBE's own rows of `table` [num_rows, padded row bytes] (write them inside `write_rows`)."""
        return self._rows[table]

    def swap_dense(self, module: torch.jit.ScriptModule) -> None:
        """Serves `module` as the dense arch from the next batch on (one reference assignment); the writer
        of a followed image also saves it beside the image (tmp + rename) and bumps the state's dense
        version, so every worker loads it before its next batch."""
        self.dense = module.to(self.device).eval()
        if self.writer and self.state is not None and self.image is not None:
            out = dense_path(self.image)
            tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
            torch.jit.save(self.dense, str(tmp))
            os.replace(tmp, out)
            self._dense_version = self.state.bump_dense()

    def _follow_dense(self) -> None:
        """A reader of a followed image: the dense arch the writer saved since this process last looked."""
        version = self.state.dense_version
        if version != self._dense_version and self.image is not None:
            self.dense = torch.jit.load(str(dense_path(self.image)), map_location=self.device).eval()
            self._dense_version = version

    def warm_up(self) -> None:
        """Score zero batches once before the model takes requests: the first forward pays for lazy kernel
        and allocator set-up (~0.5 s), which would otherwise land on the first requests' latency."""
        nfeat = len(self.features)
        for batch in (1, 64):
            self.scores(torch.zeros(batch, self.dense_features), torch.ones(nfeat * batch, dtype=torch.int64),
                        torch.zeros(nfeat * batch, dtype=torch.int64))

    @torch.inference_mode()
    def scores(self, dense: torch.Tensor, lengths: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """P(click) [B] for a validated batch (lengths feature-major over the package's features)."""
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        if values.dtype != torch.int64:
            values = values.long()
        dev = self.device
        if self.state is not None:  # a followed shared image: look up again if a delta landed meanwhile
            if not self.writer:
                self._follow_dense()
            emb = self.state.read(lambda: self.tbe(values.to(dev), offsets.to(dev)))
        else:
            with self._lock.read():
                emb = self.tbe(values.to(dev), offsets.to(dev))
        return torch.sigmoid(self.dense(dense.to(dev), emb)).cpu()


class ReadWriteLock:
    """Many readers (batches) or one writer (a delta apply); a waiting writer holds back new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
