"""Decoding at the edge: every bad record becomes a dead letter with a bounded reason."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from features.events import REASONS, DeadLetter, Label, Transaction, decode, encode

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
