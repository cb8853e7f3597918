"""The synthetic generator: deterministic, well-formed, and the fraud patterns look as promised."""

from __future__ import annotations

import gzip
import json
import math
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from features.events import Label, Transaction, decode_label, decode_transaction
from fraud.datagen import (
    REQUIRED_FIELDS,
    GeneratorConfig,
    generate,
    parse_mix,
    write_files,
)
from fraud.patterns import BASE_PATTERNS, EXTRA_PATTERNS

SMALL = GeneratorConfig(days=20, n_cards=150, drift_day=10)
# The same world (cards, merchants, everyday spending) as every `dataclasses.replace` of it that
# changes only mix or labelling: legit spending is drawn before any fraud.
WORLD = GeneratorConfig(days=60, n_cards=300, drift_day=None)
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
    ("kwargs", "message"),
    [
        ({"days": 0}, "days"),
        ({"n_merchants": 10}, "n_merchants"),
        ({"fraud_rate_target": 0.2}, "fraud_rate_target"),
        ({"drift_day": 0}, "drift_day"),
        ({"drift_pattern": "nope"}, "drift_pattern"),
        ({"start": "2026-01-05T00:00:00"}, "UTC offset"),
        ({"mix": (("nope", 1.0),)}, "known: card_testing, .*compromised_terminal"),
        ({"mix": (("merchant_cashout", 1.0),)}, "unknown fraud pattern"),
        ({"mix": (("card_testing", -1.0),)}, ">= 0"),
        ({"mix": (("card_testing", math.nan),)}, ">= 0"),
        ({"mix": (("card_testing", "1"),)}, "number"),
        ({"mix": (("card_testing", 0.0),)}, "all be zero"),
        ({"mix": (("card_testing", 1.0), ("card_testing", 2.0))}, "twice"),
        ({"mix": ()}, "at least one"),
        ({"mix": ("card_testing",)}, "pairs"),
        ({"label_policy": "some"}, "label_policy"),
        ({"label_policy": "fraud_and_sample", "legit_label_share": 0.0}, "legit_label_share"),
        ({"label_policy": "fraud_and_sample", "legit_label_share": 1.5}, "legit_label_share"),
        ({"legit_label_share": 0.5}, "only with label_policy"),
        ({"label_delay": "gamma"}, "label_delay"),
        ({"label_delay": "fixed", "label_delay_days": 0.0}, "label_delay_days"),
        ({"label_delay_days": math.inf}, "label_delay_days"),
        ({"label_delay_min_days": 5.0, "label_delay_max_days": 5.0}, "min < max"),
        ({"label_delay_min_days": 0.0}, "min < max"),
        ({"label_delay_max_days": math.nan}, "min < max"),
    ],
)
def test_bad_config_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GeneratorConfig(**kwargs)


def test_parse_mix() -> None:
    assert parse_mix("card_testing=1, compromised_terminal = 2.5") == (
        ("card_testing", 1.0),
        ("compromised_terminal", 2.5),
    )
    for bad in ("", "card_testing", "card_testing=", "=1", "card_testing=x", "nope=1", "card_testing=0"):
        with pytest.raises(ValueError):
            parse_mix(bad)


# --- knobs that change the world --------------------------------------------------------------


def _world(**changes: object) -> tuple[list[dict], list[dict]]:
    return generate(replace(WORLD, **changes))  # type: ignore[arg-type]


def _key(t: dict) -> tuple:
    """A transaction without its id and ground truth: what stays when fraud relabels it."""
    return tuple(sorted((k, v) for k, v in t.items() if k not in ("txn_id", "pattern")))


@pytest.fixture(scope="module")
def world() -> tuple[list[dict], list[dict]]:
    return generate(WORLD)


def test_mix_is_deterministic_and_seed_matters() -> None:
    cfg = GeneratorConfig(days=30, n_cards=300, mix=(("card_testing", 1.0), ("compromised_terminal", 2.0)))
    first = generate(cfg)
    assert generate(cfg) == first
    other = generate(replace(cfg, seed=8))
    assert other[0] != first[0]
    assert other[1] != first[1]
    assert first != generate(replace(cfg, mix=None))


def test_mix_restricts_patterns(tmp_path: Path) -> None:
    mix = (("large_amount", 1.0), ("card_testing", 2.0), ("inflated_spending", 0.0))
    cfg = GeneratorConfig(days=30, n_cards=300, drift_day=20, mix=mix)
    assert cfg.patterns == ("card_testing", "large_amount", "merchant_cashout")
    assert replace(cfg, drift_day=None).patterns == ("card_testing", "large_amount")
    txns, _ = generate(cfg)
    counts = Counter(t["pattern"] for t in txns if "pattern" in t)
    assert set(counts) == set(cfg.patterns)
    # card_testing has twice the weight of large_amount, both in transactions.
    assert 1.0 < counts["card_testing"] / counts["large_amount"] < 4.0
    summary = write_files(tmp_path, cfg)
    assert {k for k in summary if k.startswith("pattern_")} == {f"pattern_{p}" for p in cfg.patterns}
    assert sum(summary[f"pattern_{p}"] for p in cfg.patterns) == summary["n_fraud"] == sum(counts.values())


def test_every_extra_pattern_can_be_mixed_in() -> None:
    cfg = GeneratorConfig(days=30, n_cards=300, drift_day=None, mix=tuple((p, 1.0) for p in EXTRA_PATTERNS))
    txns, _ = generate(cfg)
    assert {t["pattern"] for t in txns if "pattern" in t} == set(EXTRA_PATTERNS)


def test_compromised_terminal_relabels_weeks_at_a_few_busy_merchants(
    world: tuple[list[dict], list[dict]],
) -> None:
    txns, _ = _world(mix=(("compromised_terminal", 1.0),))
    legit = [t for t in world[0] if "pattern" not in t]
    # Nothing added, nothing changed but the ground truth: the frauds were legit transactions.
    assert Counter(map(_key, txns)) == Counter(map(_key, legit))
    fraud = [t for t in txns if "pattern" in t]
    assert {t["pattern"] for t in fraud} == {"compromised_terminal"}
    by_merchant: dict[str, list[dict]] = defaultdict(list)
    for t in fraud:
        by_merchant[t["merchant_id"]].append(t)
    assert 2 <= len(by_merchant) <= 8
    visits = Counter(t["merchant_id"] for t in txns)
    busy = statistics.median(visits[f"m{m:04d}"] for m in range(WORLD.n_merchants))  # the busier half
    hit = total = 0
    for m, frauds in by_merchant.items():
        assert visits[m] >= busy
        first, last = _t(frauds[0]["ts"]), _t(frauds[-1]["ts"])
        assert last - first < timedelta(days=35)
        there = [t for t in txns if t["merchant_id"] == m and first <= _t(t["ts"]) <= last]
        hit, total = hit + len(frauds), total + len(there)
    # In its window a share (0.3-0.7 per incident) of the merchant's transactions are fraud.
    assert 0.3 <= hit / total <= 0.7
    assert max(_spans(by_merchant)) >= timedelta(days=10)  # weeks, not a burst


def _spans(groups: dict[str, list[dict]]) -> list[timedelta]:
    return [_t(g[-1]["ts"]) - _t(g[0]["ts"]) for g in groups.values()]


def test_compromised_card_inflates_a_third_of_the_cards_own_spending(
    world: tuple[list[dict], list[dict]],
) -> None:
    txns, _ = _world(mix=(("compromised_card", 1.0),))
    assert len(txns) == len(world[0]) - sum("pattern" in t for t in world[0])
    original = {(t["ts"], t["card_id"], t["merchant_id"]): t for t in world[0] if "pattern" not in t}
    fraud = [t for t in txns if "pattern" in t]
    assert len(fraud) >= 20
    by_card: dict[str, list[dict]] = defaultdict(list)
    for t in fraud:
        before = original[t["ts"], t["card_id"], t["merchant_id"]]
        assert {k: v for k, v in t.items() if k not in ("txn_id", "pattern", "amount")} == {
            k: v for k, v in before.items() if k not in ("txn_id", "amount")
        }
        assert 3 * before["amount"] - 0.05 <= t["amount"] <= 6 * before["amount"] + 0.05
        by_card[t["card_id"]].append(t)
    assert all(span < timedelta(days=14) for span in _spans(by_card))
    legit_amounts: dict[str, list[float]] = defaultdict(list)
    for t in txns:
        if "pattern" not in t:
            legit_amounts[t["card_id"]].append(t["amount"])
    ratios = [
        statistics.median(f["amount"] for f in frauds) / statistics.median(legit_amounts[card])
        for card, frauds in by_card.items()
    ]
    assert statistics.median(ratios) > 2.5


def test_large_amount_is_one_big_buy_on_a_usual_channel(world: tuple[list[dict], list[dict]]) -> None:
    txns, _ = _world(mix=(("large_amount", 1.0),))
    fraud = [t for t in txns if "pattern" in t]
    assert len(fraud) >= 20
    assert all(t["amount"] >= 300 for t in fraud)
    assert {t["channel"] for t in fraud} == {"pos", "online"}
    devices: dict[str, set[str]] = defaultdict(set)
    for t in txns:
        if "device_id" in t:
            devices[t["device_id"]].add(t["card_id"])
    assert all(devices[t["device_id"]] == {t["card_id"]} for t in fraud if t["channel"] == "online")
    # The world is the one of the default mix, plus these transactions.
    assert Counter(map(_key, (t for t in txns if "pattern" not in t))) == Counter(
        map(_key, (t for t in world[0] if "pattern" not in t))
    )


def _delays(txns: list[dict], labels: list[dict]) -> list[tuple[dict, float]]:
    by_id = {t["txn_id"]: t for t in txns}
    return [(lb, (_t(lb["ts"]) - _t(by_id[lb["txn_id"]]["ts"])) / timedelta(days=1)) for lb in labels]


def test_fraud_and_sample_labels_all_fraud_and_a_share_of_legit(
    world: tuple[list[dict], list[dict]],
) -> None:
    txns, labels = _world(label_policy="fraud_and_sample", legit_label_share=0.3)
    assert txns == world[0]
    all_labels = world[1]
    assert [lb for lb in all_labels if lb["is_fraud"]] == [lb for lb in labels if lb["is_fraud"]]
    assert {lb["txn_id"] for lb in labels} <= {lb["txn_id"] for lb in all_labels}
    n_legit = sum(not lb["is_fraud"] for lb in all_labels)
    assert 0.25 <= sum(not lb["is_fraud"] for lb in labels) / n_legit <= 0.35


def test_fixed_label_delay(world: tuple[list[dict], list[dict]]) -> None:
    txns, labels = _world(label_delay="fixed", label_delay_days=2.5)
    assert txns == world[0]
    assert {d for _, d in _delays(txns, labels)} == {2.5}
    end = _t(WORLD.start) + timedelta(days=WORLD.days)
    assert len(labels) == sum(_t(t["ts"]) + timedelta(days=2.5) < end for t in txns)
    _, every = _world(label_delay="fixed", label_delay_days=2.5, labels_after_end=True)
    assert len(every) == len(txns) and [lb for lb in every if _t(lb["ts"]) < end] == labels


def test_spread_label_delay(world: tuple[list[dict], list[dict]]) -> None:
    txns, labels = _world(label_delay="spread", label_delay_min_days=2.0, label_delay_max_days=30.0)
    delays = _delays(txns, labels)
    assert all(2.0 - 1e-6 <= d <= 30.0 + 1e-6 for _, d in delays)
    for fraud in (True, False):
        some = [d for lb, d in delays if lb["is_fraud"] is fraud]
        assert statistics.pstdev(some) > 5
        assert max(some) - min(some) > 15
    end = _t(WORLD.start) + timedelta(days=WORLD.days)
    assert all(_t(lb["ts"]) < end for lb in labels)


def test_minimal_records(world: tuple[list[dict], list[dict]]) -> None:
    txns, labels = _world(minimal=True)
    assert labels == world[1]
    assert len(txns) == len(world[0])
    for t, full in zip(txns, world[0], strict=True):
        keys = (*REQUIRED_FIELDS, "pattern") if "pattern" in full else REQUIRED_FIELDS
        assert tuple(t) == keys
        assert t == {k: full[k] for k in keys}
        assert isinstance(decode_transaction(json.dumps(t)), Transaction)
    assert any("pattern" in t for t in txns)


def test_cli_generate_knobs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fraud.cli import app

    runner = CliRunner()
    args = ["generate", "--days", "10", "--cards", "100", "--drift-day", "0", "--no-gzip"]
    ok = runner.invoke(
        app,
        [*args, "--out", str(tmp_path), "--mix", "large_amount=1,card_testing=1", "--minimal",
         "--label-policy", "fraud_and_sample", "--legit-label-share", "0.5", "--label-delay", "fixed",
         "--label-delay-days", "3"],
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.output)
    assert set(summary) >= {"pattern_large_amount", "pattern_card_testing"}
    assert "pattern_account_takeover" not in summary
    first = json.loads((tmp_path / "transactions.jsonl").read_text().splitlines()[0])
    assert set(first) <= {*REQUIRED_FIELDS, "pattern"}
    for bad in (
        ["--mix", "nope=1"],
        ["--mix", "card_testing"],
        ["--label-policy", "some"],
        ["--label-delay", "gamma"],
        ["--label-policy", "fraud_and_sample", "--legit-label-share", "2"],
        ["--label-delay-min-days", "9", "--label-delay-max-days", "3"],
    ):
        res = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), *bad])
        assert res.exit_code == 2, (bad, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit)
        assert not (tmp_path / "bad").exists()
