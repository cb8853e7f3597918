"""Deterministic synthetic card transactions and delayed fraud labels.

Why: the pipeline needs realistic, reproducible data to train on, replay through the flow and
benchmark against, without shipping real card data. What: cards with spending profiles and a
home city, merchants with an MCC category and a location, daily and weekly seasonality, five
classic fraud patterns plus one late "drift" pattern that appears only from `drift_day` on (so a
model trained before it has never seen it), and labels that arrive days after the transaction.
The population and everyday spending are in `fraud.synthetic`, the fraud patterns in
`fraud.patterns`; this module holds the configuration, the labels and the output.

Knobs that change the world, not just its size, so that models and the pipeline can be tested
against different kinds of fraud and labelling:

- `mix`: which fraud patterns occur and in what proportion of the fraud budget. Besides the five
  classic ones it can name three more: `compromised_terminal` (a busy merchant where, for weeks,
  a share of every transaction is fraud: only the merchant's recent fraud rate gives it away),
  `compromised_card` (for a few days some of a card's own transactions are fraud with inflated
  amounts) and `large_amount` (one-off large buys that look normal except for the amount).
- `label_policy` / `legit_label_share`: label everything, or every fraud plus a sample of the
  legit transactions (as when only disputed or audited transactions get a verdict).
- `label_delay`: how long labels take: lognormal chargebacks with quick genuine confirmations,
  one fixed delay for every label, or delays spread uniformly over weeks.
- `minimal`: records with only the fields the event contract requires, to exercise the pipeline
  when the optional enrichment is missing.
- `labels_after_end`: keep the labels that arrive after the last day too (they are replayed after
  every transaction), so that the last days can be judged on their eventual truth.

Everything is drawn from one `numpy.random.default_rng(seed)` in a fixed order, so the same
config always yields byte-identical files; a knob left at its default draws nothing extra, so
adding knobs never changes what existing configs produce. Only numpy and the standard library
are used.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np

from fraud.patterns import (
    BASE_PATTERNS,
    BASE_SHARES,
    DRIFT_PATTERNS,
    MIX_PATTERNS,
    fraud_transactions,
)
from fraud.synthetic import CATEGORIES, CITIES, DAY_MS, SyntheticWorld, everyday_spending

LabelPolicy = Literal["all", "fraud_and_sample"]
LabelDelay = Literal["lognormal", "fixed", "spread"]
LABEL_POLICIES: tuple[LabelPolicy, ...] = ("all", "fraud_and_sample")
LABEL_DELAYS: tuple[LabelDelay, ...] = ("lognormal", "fixed", "spread")
REQUIRED_FIELDS = ("txn_id", "ts", "card_id", "merchant_id", "amount")  # the event contract's


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. The defaults give ~54k transactions over 90 days with drift at day 60."""

    seed: int = 7
    days: int = 90
    start: str = "2026-01-05T00:00:00+00:00"  # RFC 3339, a Monday
    n_cards: int = 600
    n_merchants: int = 200
    fraud_rate_target: float = 0.006  # overall share of fraud txns, lands within 0.2%..1%
    label_delay_days_median: float = 4.0  # chargebacks: lognormal delay, clipped to [0.5, 45] days
    legit_label_delay_days: float = 10.0  # legit txns are confirmed genuine after this (+ jitter)
    drift_day: int | None = 60  # from this day on, a NEW fraud pattern appears (None = off)
    drift_pattern: str = "merchant_cashout"  # name of the late-introduced pattern
    # Relative weights of the non-drift fraud patterns (None: the five base ones, usual shares).
    mix: tuple[tuple[str, float], ...] | None = None
    label_policy: LabelPolicy = "all"
    legit_label_share: float = 1.0  # with "fraud_and_sample": chance that a legit txn gets a label
    label_delay: LabelDelay = "lognormal"
    label_delay_days: float = 7.0  # "fixed": every label exactly this long after its transaction
    label_delay_min_days: float = 1.0  # "spread": every label uniformly within [min, max] days
    label_delay_max_days: float = 35.0
    minimal: bool = False  # records carry only the contract's required fields (+ pattern on fraud)
    labels_after_end: bool = False  # keep labels that arrive after the period (for judging its end)

    def __post_init__(self) -> None:
        if self.days < 1 or self.n_cards < 1:
            raise ValueError("days and n_cards must be >= 1")
        if self.n_merchants < 50:
            raise ValueError("n_merchants must be >= 50 (every city needs shops)")
        if not 0 < self.fraud_rate_target < 0.05:
            raise ValueError("fraud_rate_target must be in (0, 0.05)")
        if self.label_delay_days_median <= 0 or self.legit_label_delay_days < 0:
            raise ValueError("label delays must be positive")
        if self.drift_day is not None and self.drift_day < 1:
            raise ValueError("drift_day must be >= 1 or None")
        if self.drift_pattern not in DRIFT_PATTERNS:
            raise ValueError(f"drift_pattern must be one of {DRIFT_PATTERNS}")
        if _start_ms(self.start) % 1000:
            raise ValueError("start must be a whole second")
        if self.mix is not None:
            object.__setattr__(self, "mix", _check_mix(self.mix))
        if self.label_policy not in LABEL_POLICIES:
            raise ValueError(f"label_policy must be one of {LABEL_POLICIES}, got {self.label_policy!r}")
        if not (isinstance(self.legit_label_share, int | float) and 0 < self.legit_label_share <= 1):
            raise ValueError(f"legit_label_share must be in (0, 1], got {self.legit_label_share!r}")
        if self.label_policy == "all" and self.legit_label_share != 1:
            raise ValueError("legit_label_share applies only with label_policy='fraud_and_sample'")
        if self.label_delay not in LABEL_DELAYS:
            raise ValueError(f"label_delay must be one of {LABEL_DELAYS}, got {self.label_delay!r}")
        if not (math.isfinite(self.label_delay_days) and self.label_delay_days > 0):
            raise ValueError(f"label_delay_days must be a positive number, got {self.label_delay_days!r}")
        lo, hi = self.label_delay_min_days, self.label_delay_max_days
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ValueError(
                f"label_delay_min_days and label_delay_max_days need 0 < min < max, got {lo!r}, {hi!r}"
            )

    @property
    def drift_on(self) -> bool:
        return self.drift_day is not None and self.drift_day < self.days

    @property
    def patterns(self) -> tuple[str, ...]:
        """The fraud patterns that can occur with this config, in generation order."""
        base = BASE_PATTERNS if self.mix is None else tuple(self.mix_weights())
        return (*base, self.drift_pattern) if self.drift_on else base

    def mix_weights(self) -> dict[str, float]:
        """Pattern -> share of the base fraud budget (in generation order; zero-weight ones left out)."""
        if self.mix is None:
            return {p: BASE_SHARES[p][0] for p in BASE_PATTERNS}
        weights = dict(self.mix)
        total = sum(weights.values())
        return {p: weights[p] / total for p in MIX_PATTERNS if weights.get(p, 0) > 0}


def _check_mix(mix: object) -> tuple[tuple[str, float], ...]:
    """Validates a mix (pairs of known pattern name and weight >= 0, not all zero); returns it as
    a tuple of (name, float weight)."""
    try:
        pairs = [(name, weight) for name, weight in mix]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise ValueError(f"mix must be (pattern, weight) pairs, got {mix!r}") from None
    if not pairs:
        raise ValueError("mix must name at least one pattern")
    out: list[tuple[str, float]] = []
    for name, weight in pairs:
        if name not in MIX_PATTERNS:
            raise ValueError(f"unknown fraud pattern {name!r} in mix; known: {', '.join(MIX_PATTERNS)}")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"mix weight of {name} must be a number, got {weight!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"mix weight of {name} must be a finite number >= 0, got {weight!r}")
        out.append((name, float(weight)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"mix names a pattern twice: {names}")
    if sum(w for _, w in out) <= 0:
        raise ValueError("mix weights must not all be zero")
    return tuple(out)


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """`"card_testing=1,compromised_terminal=2"` -> (("card_testing", 1.0), ("compromised_terminal",
    2.0)), for the command line. ValueError on malformed text, unknown names or bad weights."""
    pairs: list[tuple[str, float]] = []
    for item in text.split(","):
        name, eq, weight = item.partition("=")
        name, weight = name.strip(), weight.strip()
        if not eq or not name or not weight:
            raise ValueError(f"mix entries look like name=weight, got {item.strip()!r} in {text!r}")
        try:
            pairs.append((name, float(weight)))
        except ValueError:
            raise ValueError(f"mix weight of {name} must be a number, got {weight!r}") from None
    return _check_mix(pairs)


def _start_ms(start: str) -> int:
    dt = datetime.fromisoformat(start)
    if dt.tzinfo is None:
        raise ValueError(f"start must carry a UTC offset: {start!r}")
    return round(dt.timestamp() * 1000)


def _rfc3339(ms: int) -> str:
    """`2026-01-05T08:13:02.123+00:00`: UTC with explicit offset and milliseconds."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def generate(config: GeneratorConfig) -> tuple[list[dict], list[dict]]:
    """Returns (transactions, labels), each sorted by event time (ts), as plain JSON-ready dicts.

    Transaction ids are assigned in ts order. Legit transactions carry no `pattern` key; absent
    values (device_id/ip for card-present, lat/lon for online) are omitted rather than null. With
    `minimal`, records keep only the contract's required fields (and `pattern`).
    """
    start = _start_ms(config.start)
    w = SyntheticWorld(config, np.random.default_rng(config.seed), start)
    legit, cols = everyday_spending(w)
    fraud, relabel = fraud_transactions(w, len(legit), cols)
    for row, (name, factor) in relabel.items():
        ts, card, m, amount, online, dev, _ = legit[row]
        legit[row] = (ts, card, m, amount * factor, online, dev, name)
    txns = legit + fraud
    order = sorted(range(len(txns)), key=lambda i: (txns[i][0], i))
    width = max(7, len(str(len(txns))))
    cw, mw = max(5, len(str(config.n_cards))), max(4, len(str(config.n_merchants)))
    records: list[dict] = []
    for n, i in enumerate(order, start=1):
        ts, card, m, amount, online, dev, pattern = txns[i]
        city = CITIES[int(w.c_home[card])]
        rec = {
            "txn_id": f"t{n:0{width}d}",
            "ts": _rfc3339(ts),
            "card_id": f"c{card:0{cw}d}",
            "merchant_id": f"m{m:0{mw}d}",
            "amount": max(round(amount, 2), 0.01),
            "currency": city[2],
            "mcc": CATEGORIES[int(w.m_cat[m])][0],
            "country": CITIES[int(w.m_city[m])][1],
            "channel": "online" if online else "pos",
        }
        if online:
            rec["device_id"], rec["ip"] = f"d{dev:06d}", w.dev_ip[dev]
        else:
            rec["lat"], rec["lon"] = w.m_loc[m]
        if config.minimal:
            rec = {k: rec[k] for k in REQUIRED_FIELDS}
        if pattern is not None:
            rec["pattern"] = pattern
        records.append(rec)

    # Labels: by default chargebacks after a lognormal delay, genuine confirmations after a fixed
    # delay; or one fixed delay, or delays spread uniformly, for every label.
    is_fraud = np.array([txns[i][6] is not None for i in order])
    ts_arr = np.array([txns[i][0] for i in order], dtype=np.int64)
    n_txns = len(order)
    if config.label_delay == "lognormal":
        cb = np.clip(w.rng.lognormal(math.log(config.label_delay_days_median), 0.75, n_txns), 0.5, 45)
        ok = config.legit_label_delay_days + w.rng.uniform(0, 6 / 24, n_txns)
        delay = np.where(is_fraud, cb, ok)
    elif config.label_delay == "fixed":
        delay = np.full(n_txns, config.label_delay_days)
    else:
        delay = w.rng.uniform(config.label_delay_min_days, config.label_delay_max_days, n_txns)
    label_ts = ts_arr + np.round(delay * DAY_MS).astype(np.int64)
    labelled = np.ones(n_txns, dtype=bool) if config.labels_after_end else label_ts < w.end_ms
    if config.label_policy == "fraud_and_sample":  # drawn last: the default draws stay as they are
        labelled &= is_fraud | (w.rng.random(n_txns) < config.legit_label_share)
    keep = np.flatnonzero(labelled)
    keep = keep[np.lexsort((keep, label_ts[keep]))]
    labels = [
        {
            "txn_id": records[j]["txn_id"],
            "is_fraud": bool(is_fraud[j]),
            "ts": _rfc3339(int(label_ts[j])),
        }
        for j in keep.tolist()
    ]
    return records, labels


def _dumps(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()


def write_files(out_dir: Path, config: GeneratorConfig, compress: bool = False) -> dict[str, int | float]:
    """Writes out_dir/transactions.jsonl and out_dir/labels.jsonl (".jsonl.gz" when compress=True,
    gzip with mtime=0 so the bytes are reproducible), returns a summary: n_transactions, n_labels,
    n_fraud, fraud_rate and a count per pattern (`pattern_<name>`)."""
    txns, labels = generate(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl.gz" if compress else ".jsonl"
    for name, records in (("transactions", txns), ("labels", labels)):
        data = _dumps(records)
        if compress:
            data = gzip.compress(data, compresslevel=6, mtime=0)
        (out_dir / f"{name}{suffix}").write_bytes(data)
    n_fraud = sum(1 for t in txns if "pattern" in t)
    summary: dict[str, int | float] = {
        "n_transactions": len(txns),
        "n_labels": len(labels),
        "n_fraud": n_fraud,
        "fraud_rate": round(n_fraud / len(txns), 6) if txns else 0.0,
    }
    for p in config.patterns:
        summary[f"pattern_{p}"] = sum(1 for t in txns if t.get("pattern") == p)
    return summary
