"""Write the feature matrix of a replayed file as CSV, for notebooks and offline analysis.

One row per scored transaction, in arrival order: `txn_id, ts, card_id, merchant_id`, the
pipeline's feature names, then `late`. Values are exactly what `FeatureEngine` computes (floats
written with `repr`, so they parse back bit for bit); a missing value (NaN) is an empty cell.
`ts` is RFC 3339 UTC with milliseconds (`2026-01-05T08:13:02.123Z`), `late` is 1 or 0.
Dead letters (bad records, duplicate transactions, labels of unknown transactions) are skipped
and counted. Pure Python: csv and gzip from the standard library.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from features.engine import FeatureEngine, FeaturePipeline, FeatureVector, LabelEvent
from features.event_files import replay
from features.events import DeadLetter

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FRAMING = ("txn_id", "ts", "card_id", "merchant_id")


def rfc3339_ms(ts_ms: int) -> str:
    """`2026-01-05T08:13:02.123Z`: UTC, milliseconds, exact (no float rounding)."""
    dt = _EPOCH + timedelta(milliseconds=ts_ms)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ts_ms % 1000:03d}Z"


def header(pipeline: FeaturePipeline) -> list[str]:
    return [*FRAMING, *pipeline.names, "late"]


def _cell(value: float) -> str:
    return "" if value != value else repr(value)


@dataclass
class MatrixStats:
    """What an export did: rows written, labels joined, dead letters skipped (by reason)."""

    rows: int = 0
    late: int = 0
    labels: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)

    @property
    def dead_letter_total(self) -> int:
        return sum(self.dead_letters.values())


@contextmanager
def _open_out(out: Path) -> Iterator[IO[str]]:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.name.endswith(".gz"):
        # mtime=0 and no file name in the header: the same input gives byte-identical output.
        with (
            out.open("wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
            io.TextIOWrapper(gz, encoding="utf-8", newline="") as text,
        ):
            yield text
    else:
        with out.open("w", encoding="utf-8", newline="") as text:
            yield text


def export_matrix(
    pipeline: FeaturePipeline, transactions: Path, labels: Path | None, out: Path
) -> MatrixStats:
    """Replay `transactions` (and `labels`, merged in event time) and write the CSV to `out`."""
    stats = MatrixStats()
    engine = FeatureEngine(pipeline)
    with _open_out(out) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header(pipeline))
        for result in engine.run(replay(transactions, labels)):
            if isinstance(result, FeatureVector):
                t = result.txn
                writer.writerow(
                    [
                        t.txn_id,
                        rfc3339_ms(t.ts_ms),
                        t.card_id,
                        t.merchant_id,
                        *map(_cell, result.values),
                        "1" if result.late else "0",
                    ]
                )
                stats.rows += 1
                stats.late += result.late
            elif isinstance(result, LabelEvent):
                stats.labels += 1
            elif isinstance(result, DeadLetter):
                stats.dead_letters[result.reason] += 1
    return stats


def write_matrix(pipeline: FeaturePipeline, transactions: Path, labels: Path | None, out: Path) -> int:
    """Write the feature matrix CSV (`.csv.gz` when `out` ends with .gz); return the rows written."""
    return export_matrix(pipeline, transactions, labels, out).rows
