"""Replay a transactions file and a labels file, merged in event time, as a resumable source.

Merging the files needs each line's event time, which is most of decoding it, so each line is
decoded as it is read (`features.event_files.merged_events`) and handed on as its event: a
transaction, a label, or the dead letter of a bad line, which the flow's decode step passes on
as it passes on what it decodes itself (`flows.steps.decode_record`). The position (lines
consumed from each file) is the partition's snapshot, so a resumed flow skips what it already
handed out.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from features.event_files import merged_events
from features.events import Decoded


class _ReplayPartition(StatefulSourcePartition[Decoded, tuple[int, int]]):
    def __init__(
        self, txns: Path, labels: Path | None, batch_size: int, resume: tuple[int, int] | None
    ) -> None:
        self._pos = list(resume or (0, 0))
        self._events = merged_events(txns, labels, (self._pos[0], self._pos[1]))
        self._batch_size = batch_size

    def next_batch(self) -> list[Decoded]:
        batch = []
        pos = self._pos
        for event, n, label in islice(self._events, self._batch_size):
            batch.append(event)
            pos[label] = n + 1
        if not batch:
            raise StopIteration
        return batch

    def snapshot(self) -> tuple[int, int]:
        return (self._pos[0], self._pos[1])


class FileReplaySource(FixedPartitionedSource[Decoded, tuple[int, int]]):
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
