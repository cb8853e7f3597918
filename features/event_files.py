"""Read transactions and labels files (.jsonl or .jsonl.gz) merged in event time.

The same reader feeds the flow's file source and the trainer, so both see one arrival order:
event time, with a label after the transactions of the same millisecond.
"""

from __future__ import annotations

import gzip
import heapq
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import IO

import msgspec

from features.events import AwareTime, Control, DeadLetter, Decoded, Label, Transaction, decode, to_epoch_ms


class _Ts(msgspec.Struct):
    ts: int | AwareTime


_ts_decoder = msgspec.json.Decoder(_Ts)


def open_text(path: Path) -> IO[str]:
    """Open a .jsonl or .jsonl.gz file for reading text."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape")
    return path.open("r", encoding="utf-8", errors="surrogateescape")


def _lines(path: Path, skip: int) -> Iterator[tuple[int, str]]:
    """(line number, line) of each line of `path` past its first `skip`, blank lines left out."""
    with open_text(path) as f:
        for n, line in enumerate(islice(f, skip, None), start=skip):
            line = line.rstrip("\n")
            if line and not line.isspace():
                yield n, line


def _time_of(line: str, last: int) -> int:
    """The epoch ms of `line`'s `ts`, or `last` (the line before's) when it does not parse: a bad
    line sorts with the line before it (`decode` dead-letters it)."""
    try:
        return to_epoch_ms(_ts_decoder.decode(line).ts)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return last


def _keyed_lines(path: Path, kind: str, skip: int) -> Iterator[tuple[int, bool, int, str, str]]:
    """(event time, is a label, line number, kind, line): in the order `merged_records` wants when
    compared as tuples (the line numbers of one file differ, the files differ in the second item).
    An unparseable time sorts with the line before it."""
    last, label = -(2**62), kind == "label"
    for n, line in _lines(path, skip):
        last = _time_of(line, last)
        yield last, label, n, kind, line


def _decoded_lines(path: Path, kind: str, skip: int) -> Iterator[tuple[int, bool, int, Decoded]]:
    """`_keyed_lines` with each line decoded instead (`features.events.decode`, received when it
    is read, its origin `<file name>:<line>`): (event time, is a label, line number, event). The
    time comes from the decoded event, so a line is parsed once; a dead letter's time is read as
    `_keyed_lines` reads it, so both give the same order."""
    last, label, name = -(2**62), kind == "label", path.name
    for n, line in _lines(path, skip):
        event = decode(kind, line, time.time_ns(), 0, f"{name}:{n + 1}")
        # a transaction's or a label's own time; a dead letter's as `_keyed_lines` reads it
        last = event.ts_ms if isinstance(event, Transaction | Label) else _time_of(line, last)
        yield last, label, n, event


def merged_events(
    txns: Path, labels: Path | None, skip: tuple[int, int] = (0, 0)
) -> Iterator[tuple[Decoded, int, bool]]:
    """`merged_records`, each line decoded as it is read: (event, line number in its own file,
    whether it is a label), in the same order. The flow's file replay hands Bytewax these events:
    merging the files needs each line's time, which is most of decoding it."""
    streams = [_decoded_lines(txns, "txn", skip[0])]
    if labels is not None:
        streams.append(_decoded_lines(labels, "label", skip[1]))
    for _, label, n, event in heapq.merge(*streams):
        yield event, n, label


def merged_records(
    txns: Path, labels: Path | None, skip: tuple[int, int] = (0, 0)
) -> Iterator[tuple[str, str, int]]:
    """Records of both files in event-time order; labels come after transactions of the same time.

    Yields (kind, line, line number in its own file).
    """
    streams = [_keyed_lines(txns, "txn", skip[0])]
    if labels is not None:
        streams.append(_keyed_lines(labels, "label", skip[1]))
    for _, _, n, kind, line in heapq.merge(*streams):
        yield kind, line, n


def replay(txns: Path, labels: Path | None) -> Iterator[Transaction | Label | DeadLetter]:
    """Decoded events of both files in arrival order."""
    for kind, line, _ in merged_records(txns, labels):
        event = decode(kind, line)
        if not isinstance(event, Control):  # files hold transactions and labels only
            yield event
