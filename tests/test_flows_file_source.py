"""The file source (`flows.file_source`): its resumable position and a missing input."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.event_files import merged_records
from flows.file_source import FileReplaySource


def test_file_source_resumes_after_its_snapshot(small_gz: Path) -> None:
    txns, labels = small_gz / "transactions.jsonl.gz", small_gz / "labels.jsonl.gz"
    source = FileReplaySource(txns, labels, batch_size=100)
    part = source.build_part("read", "replay", None)
    first = [r for _ in range(3) for r in part.next_batch()]
    resumed = source.build_part("read", "replay", part.snapshot())
    rest: list[tuple[str, str, str]] = []
    while True:
        try:
            rest.extend(resumed.next_batch())
        except StopIteration:
            break
    # Same records, same origins (file and 1-based line) after the resume: a dead letter's identity.
    everything = [
        (k, line, f"{(txns if k == 'txn' else labels).name}:{n + 1}")
        for k, line, n in merged_records(txns, labels)
    ]
    assert first + rest == everything


def test_missing_input_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="FRAUD_TRANSACTIONS_PATH"):
        FileReplaySource(tmp_path / "nope.jsonl")
