"""The file source (`flows.file_source`): its resumable position and a missing input."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.event_files import merged_events, merged_records
from features.events import DeadLetter, Decoded, decode
from flows.file_source import FileReplaySource


def test_file_source_resumes_after_its_snapshot(small_gz: Path) -> None:
    txns, labels = small_gz / "transactions.jsonl.gz", small_gz / "labels.jsonl.gz"
    source = FileReplaySource(txns, labels, batch_size=100)
    part = source.build_part("read", "replay", None)
    first = [r for _ in range(3) for r in part.next_batch()]
    resumed = source.build_part("read", "replay", part.snapshot())
    rest: list[Decoded] = []
    while True:
        try:
            rest.extend(resumed.next_batch())
        except StopIteration:
            break
    # Same records, decoded as the flow decodes them, with the same origins (file and 1-based
    # line) after the resume: a dead letter's identity.
    everything = [
        (k, line, f"{(txns if k == 'txn' else labels).name}:{n + 1}")
        for k, line, n in merged_records(txns, labels)
    ]
    got = first + rest
    assert len(got) == len(everything)
    for event, (kind, line, origin) in zip(got, everything, strict=True):
        received = getattr(event, "received_ns", 0)  # (a dead letter keeps no arrival time)
        assert event.origin == origin and event == decode(kind, line, received, 0, origin)


def test_missing_input_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="FRAUD_TRANSACTIONS_PATH"):
        FileReplaySource(tmp_path / "nope.jsonl")


def test_merged_records_order_by_time_labels_after_transactions_of_their_millisecond(tmp_path: Path) -> None:
    """Two files each in event-time order, merged: a label after the transactions of its
    millisecond; equal times in file order; a line whose time does not parse right after the line
    before it; blank lines skipped."""
    txns, labels = tmp_path / "t.jsonl", tmp_path / "l.jsonl"
    txns.write_text(
        '{"ts": 1767225600000, "id": "a"}\n'
        '{"ts": 1767225600005, "id": "b"}\n'
        "not json\n"
        "   \n"
        '{"ts": 1767225600005, "id": "c"}\n'
        '{"ts": "2026-01-01T00:00:00.010+00:00", "id": "d"}\n'
    )
    labels.write_text(
        '{"ts": 1767225600000, "id": "L0"}\n'
        '{"ts": 1767225600005, "id": "L1"}\n'
        '{"ts": 1767225600005, "id": "L2"}\n'
        '{"ts": 1767225600011, "id": "L3"}\n'
    )
    got = [
        (kind, n, line.rsplit('"', 2)[-2] if '"id"' in line else line)
        for kind, line, n in merged_records(txns, labels)
    ]
    assert got == [
        ("txn", 0, "a"),
        ("label", 0, "L0"),
        ("txn", 1, "b"),
        ("txn", 2, "not json"),
        ("txn", 4, "c"),
        ("label", 1, "L1"),
        ("label", 2, "L2"),
        ("txn", 5, "d"),
        ("label", 3, "L3"),
    ]


def test_the_replay_decodes_each_line_once_in_the_order_of_the_lines(tmp_path: Path) -> None:
    """The file replay decodes each line as it reads it (`merged_events`), taking its time from
    the decoded event, and a dead letter's from its `ts` as `merged_records` reads it: the same
    order as the lines, dead letters included (one whose time parses, one whose does not)."""
    txns, labels = tmp_path / "t.jsonl", tmp_path / "l.jsonl"
    txn = '{"txn_id": "%s", "ts": %s, "card_id": "c1", "merchant_id": "m1", "amount": %s}'
    txns.write_text(
        "\n".join(
            [
                txn % ("a", "1767225600000", "5.0"),
                txn % ("b", "1767225600009", "-1"),  # refused (amount), its time read all the same
                "not json",  # no time: right after the line before it
                txn % ("c", '"2026-01-01T00:00:00.004+00:00"', "7.5"),
                txn % ("d", "1767225600009", "1.0"),
            ]
        )
        + "\n"
    )
    labels.write_text(
        '{"txn_id": "a", "is_fraud": true, "ts": 1767225600004}\n'
        '{"txn_id": "c", "is_fraud": false, "ts": 1767225600009}\n'
        '{"txn_id": "d", "ts": 1767225600010}\n'  # refused (no verdict)
    )
    events = list(merged_events(txns, labels))
    records = list(merged_records(txns, labels))
    assert [(n, label) for _, n, label in events] == [(n, kind == "label") for kind, _, n in records]
    assert [e.raw for e, _, _ in events] == [line for _, line, _ in records]
    assert [type(e) for e, _, _ in events] == [type(decode(kind, line)) for kind, line, _ in records]
    reasons = [e.reason for e, _, _ in events if isinstance(e, DeadLetter)]
    assert sorted(reasons) == ["bad_amount", "bad_json", "schema"]
