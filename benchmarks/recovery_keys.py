"""What an epoch close costs in Bytewax 0.21.1's recovery store, against the keys it has saved.

    python -m benchmarks.recovery_keys [--keys 100 10000 100000] [--closes 30] [--epoch-ms 100]

Why the flow keeps no key per time bucket (`flows/expiry.py`): at every epoch close Bytewax's
recovery committer runs one SQL statement over every row of its `snaps` table to delete the
superseded snapshots, and that table keeps the newest row of every key a step ever saved, a
discarded key's row too (its tombstone is the newest). So a close costs time per key ever saved,
even when the epoch touched one key.

For each `--keys` K, a one-worker Bytewax dataflow with recovery (one partition, in a temporary
directory) first creates K keys in a `stateful_batch` step (each saved once), then sends one item
a poll to a single key while `--closes` epochs close; its source measures each close the way
`fraud_epoch_pause_seconds` does (from the partition's snapshot, taken as the epoch closes, to
its next poll, which Bytewax makes only once the closed epoch is saved). `retain`: the K keys
stay; `discard`: each is dropped after its item, as an expiry bucket was. Prints the median and
the largest pause per K and mode.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, run_main

from benchmarks.common import parser

BULK = 10_000  # keys created per poll in the first phase


class _Part(StatefulSourcePartition[tuple[str, int], int]):
    def __init__(self, keys: int, closes: int, pauses: list[float]) -> None:
        self.keys, self.closes, self.pauses = keys, closes, pauses
        self.sent = 0
        self.closed: float | None = None
        self.closes_seen = 0
        self.awake: datetime | None = None

    def next_batch(self) -> list[tuple[str, int]]:
        now = time.perf_counter()
        if self.closed is not None:
            if self.sent >= self.keys:  # the first phase's closes save the keys: not counted
                self.pauses.append(now - self.closed)
            self.closed = None
        if self.sent < self.keys:
            batch = [(f"k{i}", i) for i in range(self.sent, min(self.keys, self.sent + BULK))]
            self.sent += len(batch)
            return batch
        if len(self.pauses) >= self.closes:
            raise StopIteration
        self.awake = datetime.now(UTC) + timedelta(milliseconds=2)
        return [("hot", 0)]

    def next_awake(self) -> datetime | None:
        return self.awake

    def snapshot(self) -> int:
        self.closed = time.perf_counter()
        return self.sent


class _Source(FixedPartitionedSource[tuple[str, int], int]):
    def __init__(self, keys: int, closes: int, pauses: list[float]) -> None:
        self.keys, self.closes, self.pauses = keys, closes, pauses

    def list_parts(self) -> list[str]:
        return ["0"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Part:
        return _Part(self.keys, self.closes, self.pauses)


class _Hold(StatefulBatchLogic[int, int, int]):
    """A key's state: its last item; dropped after its first batch with `discard` (but "hot")."""

    discard = False

    def __init__(self, resume: int | None) -> None:
        self.state = resume or 0

    def on_batch(self, items: list[int]) -> tuple[list[int], bool]:
        self.state = items[-1]
        return [], self.discard and self.state != 0

    def snapshot(self) -> int:
        return self.state


class _Drop(_Hold):
    discard = True


def close_pauses(keys: int, closes: int, epoch_ms: int, discard: bool, workdir: Path) -> list[float]:
    """Seconds each epoch close held the input, once `keys` keys were saved."""
    db = workdir / f"{keys}-{int(discard)}"
    db.mkdir()
    init_db_dir(db, 1)
    pauses: list[float] = []
    flow = Dataflow("recovery_keys")
    items: Any = op.input("in", flow, _Source(keys, closes, pauses))
    held = op.stateful_batch("hold", items, _Drop if discard else _Hold)
    op.output("out", held, TestingSink([]))
    run_main(flow, epoch_interval=timedelta(milliseconds=epoch_ms), recovery_config=RecoveryConfig(str(db)))
    return pauses


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--keys", type=int, nargs="+", default=[100, 10_000, 100_000])
    ap.add_argument("--closes", type=int, default=30, help="epoch closes measured per run")
    ap.add_argument("--epoch-ms", type=int, default=100, help="the epoch interval")
    args = ap.parse_args()
    print(
        f"Bytewax recovery, one worker, one partition, {args.epoch_ms}-ms epochs, {args.closes} closes each"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for keys in args.keys:
            for discard in (False, True):
                pauses = close_pauses(keys, args.closes, args.epoch_ms, discard, Path(tmp))
                mode = "discard" if discard else "retain"
                print(
                    f"keys saved {keys:>9,} ({mode:>7}): epoch close {statistics.median(pauses) * 1000:7.1f} ms "
                    f"median, {max(pauses) * 1000:7.1f} ms max",
                    flush=True,
                )


if __name__ == "__main__":
    main()
