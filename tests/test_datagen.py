"""The synthetic generator: deterministic, well-formed, and the fraud patterns look as promised."""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import defaultdict
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from features.events import Label, Transaction, decode_label, decode_transaction
from fraud.datagen import BASE_PATTERNS, GeneratorConfig, generate, write_files

SMALL = GeneratorConfig(days=20, n_cards=150, drift_day=10)
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


def _t(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def _km(a: dict, b: dict) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (a["lat"], a["lon"], b["lat"], b["lon"]))
    h = math.sin((la2 - la1) / 2) ** 2
    h += math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


@pytest.fixture(scope="module")
def small() -> tuple[list[dict], list[dict]]:
    return generate(SMALL)


@pytest.fixture(scope="module")
def moderate() -> tuple[list[dict], list[dict]]:
    return generate(GeneratorConfig(days=40, n_cards=300, drift_day=25))


def test_same_config_same_output_and_seed_matters(small: tuple[list[dict], list[dict]]) -> None:
    assert generate(SMALL) == small
    other = generate(GeneratorConfig(days=20, n_cards=150, drift_day=10, seed=8))
    assert other[0] != small[0]
    assert other[1] != small[1]


def test_both_outputs_sorted_by_ts_with_unique_ids(small: tuple[list[dict], list[dict]]) -> None:
    txns, labels = small
    for records in (txns, labels):
        assert all(TS_RE.match(r["ts"]) for r in records)
        times = [_t(r["ts"]) for r in records]
        assert times == sorted(times)
    ids = [t["txn_id"] for t in txns]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"t\d{7}", i) for i in ids)
    assert len({lb["txn_id"] for lb in labels}) == len(labels)
    start = _t(SMALL.start)
    assert start <= _t(txns[0]["ts"])
    assert _t(txns[-1]["ts"]) < start + timedelta(days=SMALL.days)


def test_labels_match_transactions_and_arrive_later(small: tuple[list[dict], list[dict]]) -> None:
    txns, labels = small
    by_id = {t["txn_id"]: t for t in txns}
    end = _t(SMALL.start) + timedelta(days=SMALL.days)
    for lb in labels:
        txn = by_id[lb["txn_id"]]
        assert lb["is_fraud"] is ("pattern" in txn)
        delay = (_t(lb["ts"]) - _t(txn["ts"])).total_seconds() / 86400
        assert _t(lb["ts"]) < end
        if lb["is_fraud"]:
            assert 0.5 - 1e-6 <= delay <= 45 + 1e-6
        else:
            assert SMALL.legit_label_delay_days <= delay <= SMALL.legit_label_delay_days + 0.5
    # Legit labels take 10 days, so only the first half of a 20-day period has them.
    assert 0.3 * len(txns) < len(labels) < 0.7 * len(txns)
    assert any(lb["is_fraud"] for lb in labels)


def test_fraud_rate_in_range(moderate: tuple[list[dict], list[dict]]) -> None:
    txns, _ = moderate
    rate = sum("pattern" in t for t in txns) / len(txns)
    assert 0.002 <= rate <= 0.01


def test_every_base_pattern_present(small: tuple[list[dict], list[dict]]) -> None:
    present = {t["pattern"] for t in small[0] if "pattern" in t}
    assert set(BASE_PATTERNS) <= present


def test_drift_pattern_only_from_drift_day(moderate: tuple[list[dict], list[dict]]) -> None:
    txns, _ = moderate
    drift_start = _t(SMALL.start) + timedelta(days=25)
    drift = [t for t in txns if t.get("pattern") == "merchant_cashout"]
    assert drift
    assert all(_t(t["ts"]) >= drift_start for t in drift)
    post = [t for t in txns if "pattern" in t and _t(t["ts"]) >= drift_start]
    assert 0.2 <= len(drift) / len(post) <= 0.65
    # Cash-like merchants, the card's own device, ordinary channel: unlike the base patterns.
    assert {t["mcc"] for t in drift} == {"6051"}
    assert len({t["merchant_id"] for t in drift}) <= 3
    cards_of_device = defaultdict(set)
    for t in txns:
        if "device_id" in t:
            cards_of_device[t["device_id"]].add(t["card_id"])
    base_devices = {t.get("device_id") for t in txns if t.get("pattern") in BASE_PATTERNS}
    usual = {(t["card_id"], t.get("device_id")) for t in txns if "pattern" not in t}
    for t in drift:
        assert t["channel"] == "online"
        assert cards_of_device[t["device_id"]] == {t["card_id"]}
        assert t["device_id"] not in base_devices
    assert sum((t["card_id"], t["device_id"]) in usual for t in drift) >= 0.75 * len(drift)


def test_no_drift_pattern_when_disabled() -> None:
    txns, _ = generate(GeneratorConfig(days=20, n_cards=150, drift_day=None))
    patterns = {t["pattern"] for t in txns if "pattern" in t}
    assert "merchant_cashout" not in patterns
    assert set(BASE_PATTERNS) <= patterns


def test_pattern_signatures(moderate: tuple[list[dict], list[dict]]) -> None:
    txns, _ = moderate
    by_card: dict[str, list[dict]] = defaultdict(list)
    for t in txns:
        by_card[t["card_id"]].append(t)

    tests = [t for t in txns if t.get("pattern") == "card_testing" and t["amount"] <= 5]
    bursts: dict[str, list[dict]] = defaultdict(list)
    for t in tests:
        bursts[t["device_id"]].append(t)
    assert bursts
    for burst in bursts.values():
        assert len(burst) >= 5
        assert len({t["merchant_id"] for t in burst}) == len(burst)
        times = [_t(t["ts"]) for t in burst]
        assert all(b - a <= timedelta(seconds=20) for a, b in pairwise(times))
        assert times[-1] - times[0] < timedelta(minutes=7)

    for t in (t for t in txns if t.get("pattern") == "account_takeover"):
        earlier = [u for u in by_card[t["card_id"]] if u["ts"] < t["ts"] and "pattern" not in u]
        assert t["device_id"] not in {u.get("device_id") for u in earlier}
        assert t["ip"] not in {u.get("ip") for u in earlier}

    travel = [t for t in txns if t.get("pattern") == "impossible_travel"]
    assert travel
    for t in travel:
        assert t["channel"] == "pos"
        before = [
            u
            for u in by_card[t["card_id"]]
            if u["channel"] == "pos"
            and "pattern" not in u
            and timedelta(0) <= _t(t["ts"]) - _t(u["ts"]) < timedelta(hours=2)
        ]
        assert any(_km(t, u) > 1000 for u in before)


def test_channel_field_rules_and_amounts(small: tuple[list[dict], list[dict]]) -> None:
    txns, _ = small
    channels = {t["channel"] for t in txns}
    assert channels == {"pos", "online"}
    for t in txns:
        assert None not in t.values()
        if t["channel"] == "pos":
            assert "lat" in t and "lon" in t
            assert "device_id" not in t and "ip" not in t
        else:
            assert re.fullmatch(r"d\d{6}", t["device_id"])
            assert re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", t["ip"])
            assert "lat" not in t and "lon" not in t
        assert isinstance(t["amount"], float)
        assert t["amount"] > 0
        assert round(t["amount"], 2) == t["amount"]
        assert len(t["mcc"]) == 4 and len(t["country"]) == 2 and len(t["currency"]) == 3


def test_records_pass_the_event_contract(small: tuple[list[dict], list[dict]]) -> None:
    txns, labels = small
    for t in txns:
        assert isinstance(decode_transaction(json.dumps(t)), Transaction)
    for lb in labels:
        assert isinstance(decode_label(json.dumps(lb)), Label)


def test_write_files_plain_and_gzip_reproducible(
    tmp_path: Path, small: tuple[list[dict], list[dict]]
) -> None:
    summary = write_files(tmp_path / "a", SMALL, compress=True)
    write_files(tmp_path / "b", SMALL, compress=True)
    write_files(tmp_path / "plain", SMALL)
    for name in ("transactions", "labels"):
        a = (tmp_path / "a" / f"{name}.jsonl.gz").read_bytes()
        assert a[4:8] == b"\0\0\0\0"  # gzip header mtime
        assert a == (tmp_path / "b" / f"{name}.jsonl.gz").read_bytes()
        plain = (tmp_path / "plain" / f"{name}.jsonl").read_bytes()
        assert gzip.decompress(a) == plain
    txns, labels = small
    lines = (tmp_path / "plain" / "transactions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == txns
    n_fraud = sum("pattern" in t for t in txns)
    assert summary["n_transactions"] == len(txns)
    assert summary["n_labels"] == len(labels)
    assert summary["n_fraud"] == n_fraud
    assert summary["fraud_rate"] == pytest.approx(n_fraud / len(txns), abs=1e-6)
    per_pattern = [summary[f"pattern_{p}"] for p in SMALL.patterns]
    assert sum(per_pattern) == n_fraud


@pytest.mark.parametrize(
    "kwargs",
    [
        {"days": 0},
        {"n_merchants": 10},
        {"fraud_rate_target": 0.2},
        {"drift_day": 0},
        {"drift_pattern": "nope"},
        {"start": "2026-01-05T00:00:00"},
    ],
)
def test_bad_config_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        GeneratorConfig(**kwargs)
