"""Streaming reader of the Criteo Kaggle / Terabyte TSV format.

A line is `label \\t I1..I13 \\t C1..C26`: integer dense features (empty: 0) transformed to
log(1 + max(x, 0)), hexadecimal categorical ids (empty: 0) hashed modulo the table's rows; feature i
of the model reads categorical column i. Malformed lines are counted by reason and skipped, or with
`strict` the first one raises, naming the file and line. Parsing can run in worker processes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from protos.model_config import ModelConfig
from trainer.batch import Batch, SparseBatch

log = logging.getLogger(__name__)
NUM_DENSE, NUM_CATEGORICAL = 13, 26
_HEX = frozenset("0123456789abcdefABCDEF")  # int(x, 16) alone would also take "0x", signs, "_" and spaces


@dataclass
class ReaderStats:
    lines: int = 0
    malformed: int = 0
    reasons: Counter = field(default_factory=Counter)


@dataclass
class Parsed:
    labels: list[float]
    dense: list[list[float]]
    cats: list[list[int]]
    bad: list[tuple[str, str, int]]  # (reason, file, line number)


def parse_chunk(args: tuple[list[tuple[str, int, str]], list[int], int]) -> Parsed:
    """Parses lines; returns good rows and the malformed ones (module-level: runs in worker processes)."""
    lines, rows, dense_width = args
    out = Parsed([], [], [], [])
    n_cat = len(rows)
    for path, lineno, text in lines:
        cols = text.rstrip("\r\n").split("\t")
        if len(cols) != 1 + NUM_DENSE + NUM_CATEGORICAL:
            out.bad.append((f"{len(cols)} columns, expected {1 + NUM_DENSE + NUM_CATEGORICAL}", path, lineno))
            continue
        if cols[0] not in ("0", "1"):
            out.bad.append(("label not 0/1", path, lineno))
            continue
        try:
            dense = [math.log1p(max(int(x), 0)) if x else 0.0 for x in cols[1 : 1 + NUM_DENSE]]
        except ValueError:
            out.bad.append(("non-integer dense value", path, lineno))
            continue
        categorical = cols[1 + NUM_DENSE :]
        if not all(_HEX.issuperset(x) for x in categorical):  # every column, whether the model reads it or not
            out.bad.append(("non-hex categorical value", path, lineno))
            continue
        cats = [int(x, 16) % r if x else 0 for x, r in zip(categorical[:n_cat], rows, strict=True)]
        out.labels.append(float(cols[0]))
        out.dense.append(dense[:dense_width] + [0.0] * (dense_width - NUM_DENSE))
        out.cats.append(cats)
    return out


class CriteoReader:
    def __init__(self, paths: list[str | Path], config: ModelConfig, batch_size: int, *, strict: bool = False,
                 num_workers: int = 0, skip_batches: int = 0) -> None:
        if len(config.features) > NUM_CATEGORICAL:
            raise ValueError(f"config has {len(config.features)} sparse features; Criteo has {NUM_CATEGORICAL}")
        if config.dense_features > NUM_DENSE:
            raise ValueError(f"config has {config.dense_features} dense features; Criteo has {NUM_DENSE}")
        self.paths = [Path(p) for p in paths]
        self.config, self.batch_size, self.strict = config, batch_size, strict
        self.num_workers, self.skip_batches = num_workers, skip_batches
        self.rows = [f.num_rows for f in config.features]
        self.stats = ReaderStats()

    def _lines(self) -> Iterator[tuple[str, int, str]]:
        for path in self.paths:
            with open(path) as f:
                for lineno, text in enumerate(f, 1):
                    yield str(path), lineno, text

    def _chunks(self) -> Iterator[tuple[list[tuple[str, int, str]], list[int], int]]:
        lines = self._lines()
        while chunk := list(islice(lines, self.batch_size)):
            yield chunk, self.rows, self.config.dense_features

    def _parsed(self) -> Iterator[Parsed]:
        if self.num_workers <= 0:
            yield from map(parse_chunk, self._chunks())
            return
        with mp.get_context("spawn").Pool(self.num_workers) as pool:
            yield from pool.imap(parse_chunk, self._chunks())  # in order

    def __iter__(self) -> Iterator[Batch]:
        self.stats = ReaderStats()
        labels: list[float] = []
        dense: list[list[float]] = []
        cats: list[list[int]] = []
        index = 0
        for parsed in self._parsed():
            self.stats.lines += len(parsed.labels) + len(parsed.bad)
            for reason, path, lineno in parsed.bad:
                if self.strict:
                    raise ValueError(f"{path}:{lineno}: malformed line ({reason})")
                self.stats.malformed += 1
                self.stats.reasons[reason] += 1
            labels += parsed.labels
            dense += parsed.dense
            cats += parsed.cats
            while len(labels) >= self.batch_size:
                if index >= self.skip_batches:
                    yield self._batch(labels[: self.batch_size], dense[: self.batch_size], cats[: self.batch_size])
                index += 1
                labels, dense, cats = labels[self.batch_size :], dense[self.batch_size :], cats[self.batch_size :]
        if labels and index >= self.skip_batches:
            yield self._batch(labels, dense, cats)
        if self.stats.malformed:
            log.warning("skipped %d malformed of %d lines: %s", self.stats.malformed, self.stats.lines,
                        dict(self.stats.reasons))

    def _batch(self, labels: list[float], dense: list[list[float]], cats: list[list[int]]) -> Batch:
        ids = torch.tensor(cats, dtype=torch.int64).t().contiguous()  # [F, B]: feature-major
        sparse = SparseBatch([f.name for f in self.config.features], torch.ones(ids.numel(), dtype=torch.int64),
                             ids.flatten())
        return Batch(torch.tensor(dense, dtype=torch.float32), sparse, torch.tensor(labels, dtype=torch.float32))
