"""Decoding at the edge: every bad record becomes a dead letter with a bounded reason."""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from features.catalog import FEATURES
from features.engine import FeatureEngine, FeaturePipeline, FeatureVector
from features.events import (
    MAX_AMOUNT,
    MAX_RECORD_BYTES,
    REASONS,
    Control,
    DeadLetter,
    Label,
    Transaction,
    decode,
    decode_label,
    encode,
)
from models.artifact import load
from models.xgb import XGBScorer

GOOD = '{"txn_id":"t1","ts":"2026-01-05T10:00:00.250+01:00","card_id":"c1","merchant_id":"m1","amount":12.5}'


def test_rfc3339_with_offset_and_epoch_ms_agree() -> None:
    a = decode("txn", GOOD)
    b = decode("txn", GOOD.replace('"2026-01-05T10:00:00.250+01:00"', "1767603600250"))
    assert isinstance(a, Transaction) and isinstance(b, Transaction)
    assert a.ts_ms == b.ts_ms == 1_767_603_600_250


def test_optional_fields_and_unknown_fields() -> None:
    raw = GOOD[:-1] + ',"channel":"online","device_id":"d1","lat":48.8,"lon":2.3,"pattern":"x","extra":[1]}'
    t = decode("txn", raw)
    assert isinstance(t, Transaction)
    assert (t.channel, t.device_id, t.lat, t.lon, t.mcc) == ("online", "d1", 48.8, 2.3, None)
    assert t.raw == raw


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json", "bad_json"),
        ('{"txn_id":"t1"', "bad_json"),
        ("[1,2]", "schema"),
        (GOOD.replace('"card_id":"c1",', ""), "schema"),
        (GOOD.replace('"card_id":"c1"', '"card_id":""'), "schema"),
        (GOOD.replace('"amount":12.5', '"amount":"12.5"'), "bad_amount"),
        (GOOD.replace('"amount":12.5', '"amount":-0.01'), "bad_amount"),
        (GOOD.replace('"amount":12.5', '"amount":1e999'), "bad_amount"),
        (GOOD.replace("+01:00", ""), "bad_time"),
        (GOOD.replace('"2026-01-05T10:00:00.250+01:00"', '"next tuesday"'), "bad_time"),
        (GOOD.replace('"2026-01-05T10:00:00.250+01:00"', "1767603600"), "bad_time"),
        (GOOD[:-1] + ',"lat":91,"lon":0}', "bad_location"),
        (GOOD[:-1] + ',"lat":45}', "bad_location"),
        (GOOD[:-1] + ',"lat":"45.5","lon":2.1}', "bad_location"),  # a coordinate of the wrong type
        (GOOD[:-1] + ',"lat":45.5,"lon":[2.1]}', "bad_location"),
        (GOOD[:-1] + ',"lat":45.5,"lon":2.1,"channel":7}', "schema"),  # another field: not a location
    ],
)
def test_bad_transactions_become_dead_letters(raw: str, reason: str) -> None:
    d = decode("txn", raw)
    assert isinstance(d, DeadLetter)
    assert (d.kind, d.reason, d.raw) == ("txn", reason, raw)
    assert d.detail


def test_labels() -> None:
    ok = decode("label", '{"txn_id":"t1","is_fraud":true,"ts":1767603600250}')
    assert isinstance(ok, Label) and ok.is_fraud and ok.ts_ms == 1_767_603_600_250
    bad = decode("label", '{"txn_id":"t1","is_fraud":"yes","ts":1767603600250}')
    assert isinstance(bad, DeadLetter) and bad.reason == "schema" and bad.txn_id == "t1"
    assert isinstance(unknown := decode("nope", "{}"), DeadLetter) and unknown.reason == "unknown_kind"


@given(st.binary(max_size=200))
def test_decode_never_raises_and_reasons_are_bounded(raw: bytes) -> None:
    for kind in ("txn", "label"):
        out = decode(kind, raw)
        if isinstance(out, DeadLetter):
            assert out.reason in REASONS


def test_encode_round_trips() -> None:
    t = decode("txn", GOOD[:-1] + ',"device_id":"d9","lat":1.5,"lon":-2.0}')
    assert isinstance(t, Transaction)
    again = decode("txn", encode(t))
    assert isinstance(again, Transaction)
    assert encode(again) == encode(t) and again.ts_ms == t.ts_ms and again.lat == 1.5


NESTED_OBJECT = '{"a":' * 3000 + "1" + "}" * 3000
NESTED_ARRAY = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("kind", "raw", "reason", "detail"),
    [
        ("txn", GOOD.replace("12.5", "1e308"), "bad_amount", "in [0, 1e+09]"),
        ("txn", GOOD.replace("12.5", "1e9"), None, None),  # the largest amount accepted
        ("txn", GOOD.replace("12.5", "1000000000.01"), "bad_amount", "1000000000.01"),
        ("txn", GOOD[:-1] + ',"extra":' + NESTED_OBJECT + "}", "bad_json", "nested deeper than 64 levels"),
        ("label", '{"txn_id":"t1","is_fraud":true,"ts":1767603600250,"x":' + NESTED_OBJECT + "}", "bad_json", "nested"),
        ("txn", GOOD[:-1] + ',"device_id":"' + "d" * 257 + '"}', "schema", "$.device_id"),
        ("txn", GOOD[:-1] + ',"device_id":"' + "d" * 256 + '"}', None, None),
        ("txn", GOOD.replace('"c1"', '"' + "c" * 257 + '"'), "schema", "$.card_id"),
        ("txn", GOOD[:-1] + ',"extra":' + NESTED_ARRAY + "}", "too_large", "at most 65,536"),
        ("label", " " * 70_000 + "{}", "too_large", "70,002 bytes"),
    ],
    ids=["amount-1e308", "amount-max", "amount-over", "nested-txn", "nested-label", "long-device",
         "device-at-limit", "long-card", "huge-txn", "huge-label"],
)  # fmt: skip
def test_hostile_records_become_dead_letters_with_their_reason(
    kind: str, raw: str, reason: str | None, detail: str | None
) -> None:
    """Values the engine or the models cannot hold (amounts that overflow, strings that would become
    huge state keys, JSON too deep for the decoder, payloads too large) never reach the flow."""
    out = decode(kind, raw)
    if reason is None:
        assert isinstance(out, Transaction)
        return
    assert isinstance(out, DeadLetter) and out.reason == reason and reason in REASONS
    assert detail is not None and detail in out.detail
    assert len(out.raw) <= 65_536


def test_the_largest_amount_passes_every_default_feature_and_the_model() -> None:
    """MAX_AMOUNT on a card with history: every feature stays finite, and XGBoost scores it."""
    engine = FeatureEngine(FeaturePipeline(FEATURES, 0))
    rows = []
    for i, amount in enumerate([1.0, MAX_AMOUNT, MAX_AMOUNT, 0.0]):
        out = engine.process(Transaction(f"t{i}", 1_767_603_600_000 + i * 60_000, "c1", "m1", amount))
        assert isinstance(out, FeatureVector)
        assert all(math.isfinite(v) for v in out.values if v == v), out.values
        rows.append(out.values)
    artifact = load(Path("models/artifacts/default"))
    scores = XGBScorer(artifact.booster, artifact.feature_names).score_with_reasons(np.array(rows), 3)[0]
    assert np.isfinite(scores).all()


def test_file_replay_and_shard_routing_survive_json_nested_too_deep(tmp_path: Path) -> None:
    """The readers that peek at a line before `decode` (event time for the merge, keys for the
    shard) pass a line nested too deep on, to be dead-lettered, instead of raising."""
    from features.event_files import replay
    from fraud.producer import route

    deep = GOOD[:-1] + ',"extra":' + NESTED_OBJECT + "}"
    path = tmp_path / "t.jsonl"
    path.write_text(GOOD + "\n" + deep + "\n")
    out = list(replay(path, None))
    assert isinstance(out[0], Transaction)
    assert isinstance(out[1], DeadLetter) and out[1].reason == "bad_json"
    assert route("txn", deep, 4, {}) == 0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("1 garbage", "bad_json"),
        ('"abc" zz', "bad_json"),
        ("null xx", "bad_json"),
        ("true}", "bad_json"),
        ("[1, 2", "bad_json"),
        ("5", "schema"),  # valid JSON, the wrong shape
        ("[1, 2]", "schema"),
        ('"just a string"', "schema"),
    ],
)
def test_garbage_starting_with_a_json_scalar_is_bad_json(raw: str, reason: str) -> None:
    """msgspec judges the first value's type before reading on: `1 garbage` is not JSON at all,
    and says so (`bad_json`); only JSON of the wrong shape is a `schema` error."""
    for kind in ("txn", "label"):
        out = decode(kind, raw)
        assert isinstance(out, DeadLetter) and out.reason == reason, (kind, out)


def test_payloads_that_are_not_utf8_are_bad_json_and_kept_byte_exact(tmp_path: Path) -> None:
    """Invalid UTF-8 (binary payloads) is dead-lettered, and the dead letter keeps the exact bytes:
    from a file line, and from bytes handed over by a stream source."""
    from features.event_files import replay
    from features.events import payload_bytes
    from flows.outputs import dlq_entry

    binary = b'{"txn_id": "\xff\xfebin", "card_id": "c\xc3", "nul": "\x00"}'
    out = decode("txn", binary)
    assert isinstance(out, DeadLetter) and out.reason == "bad_json" and "UTF-8" in out.detail
    assert payload_bytes(out.raw) == binary and dlq_entry(out)["raw"] == binary
    assert out.kind == "txn" and dlq_entry(out)["kind"] == "txn"  # `fraud dead-letters` shows txn:bad_json
    raw_label = b'{"txn_id": "\xff", "is_fraud": true}'
    label = decode("label", raw_label, 0, 0, "labels#9-0")
    assert isinstance(label, DeadLetter) and (label.kind, label.reason) == ("label", "bad_json")
    assert label.detail.startswith("not UTF-8: ") and payload_bytes(label.raw) == raw_label
    assert (label.txn_id, label.origin) == (None, "labels#9-0")  # where to find it in the stream
    bad = decode("label", b'{"txn_id": "t1", "is_fraud": "maybe"}', 0, 0, "labels#10-0")
    assert isinstance(bad, DeadLetter) and (bad.txn_id, bad.origin) == ("t1", "labels#10-0")
    deep = decode("label", b'{"txn_id": "t1", "x": ' + b"[" * 200 + b"]" * 200 + b"}", 0, 0, "labels#11-0")
    assert isinstance(deep, DeadLetter) and (deep.reason, deep.txn_id, deep.origin) == (
        "bad_json",
        "t1",
        "labels#11-0",
    )

    path = tmp_path / "t.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + binary + b"\n" + GOOD.replace('"t1"', '"t2"').encode() + b"\n")
    events = list(replay(path, None))
    assert [type(e) for e in events] == [Transaction, DeadLetter, Transaction]
    dead = events[1]
    assert isinstance(dead, DeadLetter) and payload_bytes(dead.raw) == binary


def test_json_depth_is_bounded_at_64_levels_whatever_the_stack() -> None:
    """The record object is level 1; 64 levels pass, 65 are bad_json, brackets in strings do not
    count, and a cut-short record is measured too."""
    from features.events import MAX_JSON_DEPTH, json_depth

    def nested(levels: int) -> str:  # the record plus `levels - 1` levels of arrays inside it
        return GOOD[:-1] + ',"x":' + "[" * (levels - 1) + "]" * (levels - 1) + "}"

    assert MAX_JSON_DEPTH == 64
    assert isinstance(decode("txn", nested(64)), Transaction)
    out = decode("txn", nested(65))
    assert isinstance(out, DeadLetter) and out.reason == "bad_json" and "deeper than 64" in out.detail
    assert isinstance(decode("txn", GOOD[:-1] + ',"x":"' + "[{" * 1000 + '"}'), Transaction)
    assert json_depth(b'{"a": [1, {"b": "[[[["}]}') == 3
    assert json_depth(b'{"a": "\\"[[", "b": [[[') == 4
    label = '{"txn_id":"t1","is_fraud":true,"ts":1767603600250,"x":' + "[" * 70 + "]" * 70 + "}"
    assert decode("label", label).reason == "bad_json"  # type: ignore[union-attr]


def test_a_label_keeps_its_arrival_metadata_and_payload() -> None:
    """What the canonical order and the dead letters rely on: a label's place (`seq`), arrival
    time and origin as the source gave them, and its payload verbatim; read without them (a file,
    the decision log), it has none."""
    raw = '{"txn_id":"t1","is_fraud":false,"ts":1767603600250}'
    got = decode("label", raw, 5, 7, "s#1-0")
    assert isinstance(got, Label)
    assert (got.received_ns, got.seq, got.raw, got.origin) == (5, 7, raw, "s#1-0")
    plain = decode_label(raw)
    assert isinstance(plain, Label) and (plain.received_ns, plain.seq, plain.origin) == (0, 0, "")


def test_a_bad_labels_dead_letter_says_label_and_keeps_the_payload() -> None:
    raw = '{"txn_id":"t7","is_fraud":"yes","ts":1767603600250}'
    d = decode("label", raw, 5, 7, "s#2-0")
    assert isinstance(d, DeadLetter)
    assert (d.kind, d.reason, d.raw, d.txn_id, d.origin) == ("label", "schema", raw, "t7", "s#2-0")
    assert d.detail == "Expected `bool`, got `str` - at `$.is_fraud`"
    broken = decode("label", '{"txn_id":"t7",', 5, 7, "s#2-1")  # cut short: not JSON at all
    assert isinstance(broken, DeadLetter)
    assert (broken.kind, broken.reason, broken.raw, broken.origin) == (
        "label",
        "bad_json",
        '{"txn_id":"t7",',
        "s#2-1",
    )
    assert broken.detail.startswith("Input data was truncated")


def test_what_the_dead_letter_of_a_payload_that_is_not_json_says() -> None:
    """The detail is the reader's only clue: the decoder's own message for garbage after a JSON
    scalar, and that it is not JSON for a string that is not UTF-8."""
    for kind in ("txn", "label"):
        d = decode(kind, "1 garbage")
        assert isinstance(d, DeadLetter) and d.detail.startswith("JSON is malformed: trailing characters")
        d = decode(kind, b'"\xff"')
        assert isinstance(d, DeadLetter)
        assert (d.reason, d.detail) == ("bad_json", "not JSON (nested too deeply, or not UTF-8)")


def test_json_depth_counts_closed_siblings_right() -> None:
    """Many closed arrays side by side are shallow (accepted); an array too deep after a closed
    sibling is still too deep (refused)."""
    siblings = GOOD[:-1] + ',"x":{"a":[' + ",".join(["[1]"] * 100) + "]}}"
    assert isinstance(decode("txn", siblings), Transaction)
    # the record is level 1, "x" level 2, "a" closes at 3, then 63 arrays: levels 3 to 65
    deep_after = GOOD[:-1] + ',"x":{"a":[1],"b":' + "[" * 63 + "]" * 63 + "}}"
    out = decode("txn", deep_after)
    assert isinstance(out, DeadLetter) and out.reason == "bad_json" and "deeper than 64" in out.detail
    shallower = GOOD[:-1] + ',"x":{"a":[1],"b":' + "[" * 62 + "]" * 62 + "}}"
    assert isinstance(decode("txn", shallower), Transaction)


def test_a_record_of_exactly_the_size_limit_is_read_and_its_dead_letter_names_it() -> None:
    base = '{"txn_id":"t5","is_fraud":"yes","ts":1767603600250,"pad":"'
    raw = base + "x" * (MAX_RECORD_BYTES - len(base) - 2) + '"}'
    assert len(raw.encode()) == MAX_RECORD_BYTES
    d = decode("label", raw)
    assert isinstance(d, DeadLetter) and (d.reason, d.txn_id) == ("schema", "t5")
    over = decode("label", raw[:-2] + 'x"}')
    assert isinstance(over, DeadLetter) and (over.reason, over.txn_id) == ("too_large", None)


def test_operator_commands_decode_with_their_place_or_become_bad_control_dead_letters() -> None:
    """A command keeps everything the scorer and the signature check read, and its place in the
    order; one that cannot be applied is a `bad_control` dead letter that says why."""
    raw = '{"command":"champion","version":"v2","digest":"ab12","sig":"s1"}'
    c = decode("control", raw, 5, 7, "s#3-0")
    assert c == Control("champion", "v2", "ab12", "", 0, 5, 7, raw, "s#3-0", "s1")
    assert decode("control", '{"command":"shadow"}') == Control("shadow", raw='{"command":"shadow"}')
    rules = '{"command":"rules","version":"r1","digest":"cd","text":"amount > 5"}'
    r = decode("control", rules)
    assert isinstance(r, Control) and (r.command, r.text, r.sig) == ("rules", "amount > 5", "")
    for bad, detail in (
        ('{"command":"champion","version":"v2"}', "a 'champion' command needs a version and a digest"),
        ('{"command":"rules","digest":"cd"}', "a 'rules' command needs a version and a digest"),
        ('{"command":"retrain"}', "Invalid enum value 'retrain' - at `$.command`"),
        ('{"command":"shadow","extra":1}', "Object contains unknown field `extra`"),
        ("{nope", "JSON is malformed: object keys must be strings (byte 1)"),
    ):
        d = decode("control", bad, 5, 7, "s#4-0")
        assert isinstance(d, DeadLetter), bad
        assert (d.kind, d.reason, d.detail, d.raw, d.origin) == (
            "control",
            "bad_control",
            detail,
            bad,
            "s#4-0",
        )
    big = decode("control", '{"command":"rules","text":"' + "x" * MAX_RECORD_BYTES + '"}')
    assert isinstance(big, DeadLetter) and (big.kind, big.reason) == ("control", "too_large")
    assert len(big.raw) == MAX_RECORD_BYTES  # the dead letter keeps the first 64 KiB, not all


def test_decoding_with_little_stack_left_gives_a_dead_letter_not_a_crash() -> None:
    """msgspec counts its nesting against the interpreter's recursion limit, so a record it reads
    fine may fail when the caller's stack is already deep: each kind's decoder still returns a
    dead letter (`bad_json`, the payload and its origin kept), never raises."""
    from features.events import _TOO_DEEP

    nested = ',"x":' + "[" * 60 + "]" * 60 + "}"
    records = {
        "txn": GOOD[:-1] + nested,
        "label": '{"txn_id":"t1","is_fraud":true,"ts":1767603600250' + nested,
    }
    old = sys.getrecursionlimit()
    for kind, raw in records.items():
        assert not isinstance(decode(kind, raw), DeadLetter)  # with room to spare: fine
        sys.setrecursionlimit(len(inspect.stack()) + 40)
        try:
            out = decode(kind, raw, 0, 0, "s#9-0")
        finally:
            sys.setrecursionlimit(old)
        assert isinstance(out, DeadLetter), kind
        assert (out.kind, out.reason, out.detail, out.raw, out.origin) == (
            kind,
            "bad_json",
            _TOO_DEEP,
            raw,
            "s#9-0",
        )
