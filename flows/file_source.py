"""Replay a transactions file and a labels file, merged in event time, as a resumable source.

Each record is handed on as raw text with its kind; decoding happens in the flow so that a bad
line becomes a dead letter there, like any other bad input. The position (lines consumed from
each file) is the partition's snapshot, so a resumed flow skips what it already handed out.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from features.event_files import merged_records
from features.events import Record


class _ReplayPartition(StatefulSourcePartition[Record, tuple[int, int]]):
    def __init__(
        self, txns: Path, labels: Path | None, batch_size: int, resume: tuple[int, int] | None
    ) -> None:
        self._pos = list(resume or (0, 0))
        self._records = merged_records(txns, labels, (self._pos[0], self._pos[1]))
        self._names = {"txn": txns.name, "label": labels.name if labels is not None else ""}
        self._batch_size = batch_size

    def next_batch(self) -> list[Record]:
        batch = []
        for kind, line, n in islice(self._records, self._batch_size):
            batch.append((kind, line, f"{self._names[kind]}:{n + 1}"))
            self._pos[kind == "label"] = n + 1
        if not batch:
            raise StopIteration
        return batch

    def snapshot(self) -> tuple[int, int]:
        return (self._pos[0], self._pos[1])


class FileReplaySource(FixedPartitionedSource[Record, tuple[int, int]]):
    """One partition replaying `transactions` (+ `labels`) in event time, in batches."""

    def __init__(self, transactions: Path, labels: Path | None = None, batch_size: int = 1000) -> None:
        for p in (transactions, labels):
            if p is not None and not p.is_file():
                raise FileNotFoundError(
                    f"input file {p} does not exist (set FRAUD_TRANSACTIONS_PATH / FRAUD_LABELS_PATH)"
                )
        self.transactions, self.labels, self.batch_size = transactions, labels, batch_size

    def list_parts(self) -> list[str]:
        return ["replay"]

    def build_part(
        self, step_id: str, for_part: str, resume_state: tuple[int, int] | None
    ) -> _ReplayPartition:
        return _ReplayPartition(self.transactions, self.labels, self.batch_size, resume_state)
