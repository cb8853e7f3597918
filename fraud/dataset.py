"""Training data from files: each transaction's features, time, card, id and label, in arrays.

`build_dataset` replays a transactions file and its labels through the feature engine (the flow's
code path) into a `Dataset`: the feature matrix in a temporary file (`models.matrix.RowFile`), the
rest as NumPy arrays, labels joined from the labels file by sorting. Memory is bounded by the
engine's windows and the label window, not by the file (docs/models.md says what it needs).
`fraud.train` judges and trains on it; `fraud.decision_log` builds the same `Dataset` from what
the flow served.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import msgspec
import numpy as np

from features.engine import FeatureEngine, FeaturePipeline, FeatureVector
from features.event_files import open_text, replay
from features.events import AwareTime, DeadLetter, to_epoch_ms
from models.matrix import Matrix, RowFile

DAY_MS = 86_400_000
NO_LABEL = np.iinfo(np.int64).max  # label time of a transaction that never got one
CHUNK = 65_536  # ids gathered into one array at a time


class _Truth(msgspec.Struct):
    txn_id: str
    is_fraud: bool
    ts: int | AwareTime


class _Pattern(msgspec.Struct):
    txn_id: str
    pattern: str | None = None


_Row = TypeVar("_Row", _Truth, _Pattern)


def _records(path: Path, kind: type[_Row]) -> Iterator[_Row]:
    """The lines of a .jsonl(.gz) file decoded as `kind`; lines that do not decode are skipped
    (the flow dead-letters them; offline evaluation only needs the good ones)."""
    dec = msgspec.json.Decoder(kind)
    with open_text(path) as f:
        for line in f:
            try:
                yield dec.decode(line)
            except (msgspec.DecodeError, ValueError):
                continue


def read_labels(labels: Path | None) -> dict[str, tuple[bool, int]]:
    """Every verdict in a labels file with its arrival time (epoch ms); the first one counts."""
    out: dict[str, tuple[bool, int]] = {}
    if labels is None:
        return out
    for t in _records(labels, _Truth):
        try:
            out.setdefault(t.txn_id, (t.is_fraud, to_epoch_ms(t.ts)))
        except ValueError:
            continue
    return out


def read_truth(labels: Path | None) -> dict[str, bool]:
    """Every verdict in a labels file, whenever it arrived (for offline judging only)."""
    return {k: v[0] for k, v in read_labels(labels).items()}


def read_patterns(transactions: Path) -> dict[str, str]:
    """The generator's ground-truth `pattern` of each fraud transaction (not part of the contract)."""
    return {p.txn_id: p.pattern for p in _records(transactions, _Pattern) if p.pattern}


def id_array(ids: Iterable[str]) -> np.ndarray:
    """Transaction ids as one NumPy bytes array (UTF-8, each with a `.` appended: NumPy drops
    trailing NUL bytes, the terminator keeps every id exact): the id's length plus one byte a row,
    where a list of Python strings costs an object and a pointer per row."""
    return np.array([i.encode() + b"." for i in ids], dtype=np.bytes_)


def label_columns(labels: Path | None, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's verdict (1 fraud, 0 genuine, -1 none) and its arrival time (NO_LABEL: none) for
    the rows' `ids` (`id_array`): the first verdict of the labels file per txn_id, as
    `read_labels` has it. The labels are read a chunk at a time and looked up in the sorted ids:
    nothing of the file is kept (a dictionary of a year's labels costs more than its matrix)."""
    y = np.full(len(ids), -1, dtype=np.int8)
    when = np.full(len(ids), NO_LABEL, dtype=np.int64)
    if labels is None or not len(ids):
        return y, when
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]

    def join(chunk: list[str], verdicts: list[bool], times: list[int]) -> None:
        found, first = np.unique(id_array(chunk), return_index=True)  # a chunk's first verdicts
        lo = np.searchsorted(ordered, found, side="left")
        hi = np.searchsorted(ordered, found, side="right")
        for repeat in range(int((hi - lo).max(initial=0))):  # a txn_id on several rows: each
            at = np.flatnonzero(hi - lo > repeat)
            rows = order[lo[at] + repeat]
            unset = when[rows] == NO_LABEL  # an earlier chunk's verdict counts
            rows, at = rows[unset], first[at[unset]]
            y[rows] = np.asarray(verdicts, dtype=np.int8)[at]
            when[rows] = np.asarray(times, dtype=np.int64)[at]

    chunk: list[str] = []
    verdicts: list[bool] = []
    times: list[int] = []
    for t in _records(labels, _Truth):
        try:
            times.append(to_epoch_ms(t.ts))
        except ValueError:
            continue
        verdicts.append(t.is_fraud)
        chunk.append(t.txn_id)
        if len(chunk) == CHUNK:
            join(chunk, verdicts, times)
            chunk, verdicts, times = [], [], []
    join(chunk, verdicts, times)
    return y, when


@dataclass
class Dataset:
    """Transactions in arrival order with their features, eventual label and its arrival time.

    `X` is a NumPy matrix or a `RowFile` (rows on disk, what `build_dataset` makes); `cards`
    holds each row's card as its rank among the card ids (int32: equal for one card, ordered as
    the ids are); `ids` the rows' txn_ids as `id_array` makes them."""

    X: Matrix
    y: np.ndarray  # 1 fraud, 0 genuine, -1 no label in the file
    label_ts: np.ndarray  # when the label arrived (epoch ms); NO_LABEL when it never did
    ts_ms: np.ndarray
    cards: np.ndarray
    ids: np.ndarray
    dead_letters: int = 0
    day0_ms: int = field(init=False)

    def __post_init__(self) -> None:
        self.day0_ms = int(self.ts_ms.min()) // DAY_MS * DAY_MS if self.ts_ms.size else 0

    @classmethod
    def of(
        cls, X: Matrix, ts: Sequence[int], ids: list[str], cards: Sequence[str],
        labels: dict[str, tuple[bool, int]], dead_letters: int = 0,
    ) -> Dataset:  # fmt: skip
        y = np.array([int(labels[i][0]) if i in labels else -1 for i in ids], dtype=np.int8)
        label_ts = np.array([labels[i][1] if i in labels else NO_LABEL for i in ids], dtype=np.int64)
        ts_ms = np.asarray(ts, dtype=np.int64)
        ranks = np.unique(np.asarray(cards), return_inverse=True)[1].reshape(-1).astype(np.int32)
        return cls(X, y, label_ts, ts_ms, ranks, id_array(ids), dead_letters)

    @property
    def txn_ids(self) -> list[str]:
        return [i[:-1].decode() for i in self.ids.tolist()]

    def __len__(self) -> int:
        return len(self.ts_ms)

    @property
    def day(self) -> np.ndarray:
        """Each row's day, counted from the first transaction's UTC day."""
        return (self.ts_ms - self.day0_ms) // DAY_MS

    def period(self, start_day: float, end_day: float) -> np.ndarray:
        t = self.ts_ms - self.day0_ms
        return (t >= start_day * DAY_MS) & (t < end_day * DAY_MS)

    def training_rows(self, start_day: float, end_day: float) -> np.ndarray:
        """Rows of the period whose label had arrived by its end (what a model trained then knows)."""
        return self.period(start_day, end_day) & (self.label_ts < self.day0_ms + end_day * DAY_MS)

    def evaluation_rows(self, start_day: float, end_day: float) -> np.ndarray:
        """Labelled rows of the period, without cards already known compromised that day."""
        return self.period(start_day, end_day) & (self.y >= 0) & ~self.known_compromised

    @cached_property
    def known_compromised(self) -> np.ndarray:
        """Rows whose card had a fraud label arrive before the row's day began."""
        codes = self.cards  # ranks 0..cards-1
        first = np.full(int(codes.max()) + 1 if codes.size else 0, NO_LABEL, dtype=np.int64)
        fraud = self.y == 1
        np.minimum.at(first, codes[fraud], self.label_ts[fraud])
        return first[codes] < self.day0_ms + self.day * DAY_MS


def build_dataset(
    pipeline: FeaturePipeline,
    transactions: Path,
    labels: Path | None,
    *,
    label_ttl_days: float | None = None,
    directory: Path | None = None,
) -> Dataset:
    """Replay the files (labels merged in event time) and collect every transaction's features
    into a `RowFile` (a temporary file in `directory`, the system's temporary directory by
    default), its time, id and card as arrays, and its label joined from the labels file. With
    `label_ttl_days` the engine forgets a transaction once its label can no longer arrive, as the
    flow does (a label later than that joins no feature, in training as in serving); without it
    the engine keeps every transaction. What stays in memory is the engine's windows, the
    transactions waiting for their labels and a few fixed-width numbers per row plus the ids."""
    ttl = None if label_ttl_days is None else round(label_ttl_days * DAY_MS)
    engine = FeatureEngine(pipeline, index_ttl_ms=ttl)
    X = RowFile(len(pipeline.names), directory)
    ts = array("q")
    card_of: dict[str, int] = {}
    card_codes = array("i")
    id_parts: list[np.ndarray] = []
    chunk: list[str] = []
    dead = 0
    for out in engine.run(replay(transactions, labels)):
        if isinstance(out, FeatureVector):
            X.append(out.values)
            ts.append(out.txn.ts_ms)
            chunk.append(out.txn.txn_id)
            if len(chunk) == CHUNK:
                id_parts.append(id_array(chunk))
                chunk.clear()
            code = card_of.get(out.txn.card_id)
            if code is None:
                code = card_of[out.txn.card_id] = len(card_of)
            card_codes.append(code)
        elif isinstance(out, DeadLetter):
            dead += 1
    del engine
    id_parts.append(id_array(chunk))
    ids = np.concatenate(id_parts)
    # Cards as their rank among the card ids: the same equalities and order as the ids themselves.
    rank = np.empty(len(card_of), dtype=np.int32)
    rank[np.argsort(np.array(list(card_of)))] = np.arange(len(card_of), dtype=np.int32)
    cards = rank[np.frombuffer(card_codes, dtype=np.int32)] if card_codes else np.empty(0, np.int32)
    y, label_ts = label_columns(labels, ids)
    return Dataset(X, y, label_ts, np.frombuffer(ts, dtype=np.int64), cards, ids, dead)
