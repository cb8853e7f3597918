"""Deterministic synthetic card transactions and delayed fraud labels.

Why: the pipeline needs realistic, reproducible data to train on, replay through the flow and
benchmark against, without shipping real card data. What: cards with spending profiles and a
home city, merchants with an MCC category and a location, daily and weekly seasonality, five
classic fraud patterns plus one late "drift" pattern that appears only from `drift_day` on (so a
model trained before it has never seen it), and labels that arrive days after the transaction.

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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

BASE_PATTERNS = (
    "card_testing",
    "account_takeover",
    "compromised_merchant",
    "inflated_spending",
    "impossible_travel",
)
DRIFT_PATTERNS = ("merchant_cashout",)
# Patterns that occur only when `mix` names them.
EXTRA_PATTERNS = (
    "compromised_terminal",
    "compromised_card",
    "large_amount",
)
MIX_PATTERNS = (*BASE_PATTERNS, *EXTRA_PATTERNS)  # what `mix` may name, in generation order
LabelPolicy = Literal["all", "fraud_and_sample"]
LabelDelay = Literal["lognormal", "fixed", "spread"]
LABEL_POLICIES: tuple[LabelPolicy, ...] = ("all", "fraud_and_sample")
LABEL_DELAYS: tuple[LabelDelay, ...] = ("lognormal", "fixed", "spread")
REQUIRED_FIELDS = ("txn_id", "ts", "card_id", "merchant_id", "amount")  # the event contract's

# (name, country, currency, lat, lon, weight): where cards live and merchants sit.
CITIES = (
    ("Paris", "FR", "EUR", 48.8566, 2.3522, 1.6),
    ("Berlin", "DE", "EUR", 52.5200, 13.4050, 1.4),
    ("Madrid", "ES", "EUR", 40.4168, -3.7038, 1.3),
    ("Rome", "IT", "EUR", 41.9028, 12.4964, 1.1),
    ("Milan", "IT", "EUR", 45.4642, 9.1900, 0.9),
    ("Barcelona", "ES", "EUR", 41.3874, 2.1686, 1.0),
    ("Amsterdam", "NL", "EUR", 52.3676, 4.9041, 0.9),
    ("Brussels", "BE", "EUR", 50.8503, 4.3517, 0.7),
    ("Vienna", "AT", "EUR", 48.2082, 16.3738, 0.8),
    ("Munich", "DE", "EUR", 48.1351, 11.5820, 0.8),
    ("Lyon", "FR", "EUR", 45.7640, 4.8357, 0.6),
    ("Lisbon", "PT", "EUR", 38.7223, -9.1393, 0.7),
    ("Dublin", "IE", "EUR", 53.3498, -6.2603, 0.6),
    ("Warsaw", "PL", "PLN", 52.2297, 21.0122, 0.8),
    ("Stockholm", "SE", "SEK", 59.3293, 18.0686, 0.6),
)

# (mcc, share of merchants, amount scale vs the card's mean, online?, weekend factor, how often
# a merchant of the category is visited relative to others)
CATEGORIES = (
    ("5411", 0.20, 1.0, False, 1.25, 2.0),  # grocery
    ("5812", 0.18, 0.9, False, 1.40, 1.5),  # restaurants
    ("5541", 0.09, 1.3, False, 0.90, 1.0),  # fuel
    ("5912", 0.06, 0.7, False, 0.80, 0.8),  # pharmacy
    ("5732", 0.06, 4.0, False, 1.30, 0.3),  # electronics
    ("5999", 0.12, 1.5, True, 1.10, 1.0),  # online retail
    ("5310", 0.08, 1.1, True, 1.10, 1.0),  # discount / marketplace
    ("4511", 0.05, 6.0, True, 0.90, 0.15),  # airlines / travel
    ("5816", 0.10, 0.3, True, 1.20, 1.0),  # digital goods
    ("6051", 0.04, 1.2, True, 1.00, 0.03),  # cash-like (quasi-cash, top-ups): rarely used
)
CASH_MCC = "6051"
MIN_CASH_MERCHANTS = 3

# Relative transaction intensity per hour of day (UTC is treated as local time) and per weekday.
HOURLY = np.array([0.2, 0.1, 0.05, 0.05, 0.05, 0.1, 0.3, 0.7, 1.0, 1.0, 1.1, 1.4,
                   1.8, 1.6, 1.1, 1.0, 1.1, 1.4, 1.8, 1.9, 1.6, 1.1, 0.7, 0.4])  # fmt: skip
WEEKDAY = np.array([1.0, 0.95, 0.95, 1.0, 1.15, 1.3, 1.0])  # Monday .. Sunday
IP_FIRST_OCTETS = (31, 37, 46, 62, 77, 78, 80, 81, 82, 84, 86, 88, 90, 91, 92, 93, 94, 95, 176,
                   178, 185, 188, 212, 213, 217)  # fmt: skip

# Expected fraud transactions per incident, used to turn a txn budget into incident counts.
_BASE_SHARES = {
    "card_testing": (0.22, 13.0),
    "account_takeover": (0.20, 4.5),
    "compromised_merchant": (0.20, 0.0),  # budgeted in transactions directly
    "inflated_spending": (0.20, 5.5),
    "impossible_travel": (0.18, 1.0),
}
# Expected fraud transactions per incident of the extra patterns (0: budgeted in transactions).
_EXTRA_SIZES = {"compromised_terminal": 0.0, "compromised_card": 0.0, "large_amount": 1.0}
_DRIFT_SHARE_OF_POST = 0.4  # target share of the drift pattern among post-drift fraud
_DRIFT_SIZE = 4.5


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
            return {p: _BASE_SHARES[p][0] for p in BASE_PATTERNS}
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


def _haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (*a, *b))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


class _Pool:
    """Merchants to pick from with popularity weights (inverse-CDF over fixed arrays)."""

    def __init__(self, ids: np.ndarray, weights: np.ndarray) -> None:
        self.ids = ids
        self.cum = np.cumsum(weights) / weights.sum()

    def pick(self, u: np.ndarray) -> np.ndarray:
        return self.ids[np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.ids) - 1)]


# A transaction before ids and formatting: (ts_ms, card, merchant, amount, online, device, pattern)
Txn = tuple[int, int, int, float, bool, int, str | None]


class _World:
    """Cards, merchants, devices and merchant pools, drawn once from the rng in a fixed order."""

    def __init__(self, cfg: GeneratorConfig, rng: np.random.Generator, start_ms: int) -> None:
        self.cfg, self.rng = cfg, rng
        self.start_ms, self.end_ms = start_ms, start_ms + cfg.days * DAY_MS
        self.dev_ip: list[str] = []  # device index -> its ip; device id is f"d{index:06d}"
        self._merchants()
        self._cards()

    def _merchants(self) -> None:
        rng, n = self.rng, self.cfg.n_merchants
        shares = np.array([c[1] for c in CATEGORIES])
        counts = np.floor(shares / shares.sum() * n).astype(int)
        cash = [c[0] for c in CATEGORIES].index(CASH_MCC)
        counts[cash] = max(counts[cash], MIN_CASH_MERCHANTS)
        counts[0] += n - counts.sum()  # remainder goes to grocery
        self.m_cat = rng.permutation(np.repeat(np.arange(len(CATEGORIES)), counts))
        city_w = np.array([c[5] for c in CITIES])
        self.m_city = rng.choice(len(CITIES), size=n, p=city_w / city_w.sum())
        online = np.array([CATEGORIES[k][3] for k in self.m_cat])
        pos_idx = np.flatnonzero(~online)
        self.m_city[pos_idx[: len(CITIES)]] = np.arange(len(CITIES))  # every city has shops
        freq = np.array([CATEGORIES[k][5] for k in self.m_cat])
        self.m_pop = rng.lognormal(0.0, 1.0, size=n) * freq
        jitter = rng.uniform(-0.04, 0.04, size=(n, 2))
        self.m_loc = [
            (round(CITIES[c][3] + j[0], 4), round(CITIES[c][4] + j[1], 4))
            for c, j in zip(self.m_city.tolist(), jitter.tolist(), strict=True)
        ]
        self.m_online = online
        self.m_scale = np.array([CATEGORIES[k][2] for k in self.m_cat])
        weekend = np.array([CATEGORIES[k][4] for k in self.m_cat])
        on_ids = np.flatnonzero(online)
        self.online_pool = [_Pool(on_ids, self.m_pop[on_ids] * (weekend[on_ids] if w else 1.0))
                            for w in (False, True)]  # fmt: skip
        self.pos_pool: dict[tuple[int, bool], _Pool] = {}
        for city in range(len(CITIES)):
            ids = np.flatnonzero(~online & (self.m_city == city))
            for w in (False, True):
                self.pos_pool[city, w] = _Pool(ids, self.m_pop[ids] * (weekend[ids] if w else 1.0))
        cash_ids = np.flatnonzero(self.m_cat == cash)
        self.cashout = np.sort(rng.choice(cash_ids, size=MIN_CASH_MERCHANTS, replace=False))
        mccs = np.array([CATEGORIES[k][0] for k in self.m_cat])
        # Fraudsters of the base patterns shop online, never at cash-like merchants.
        self.testing_pool = np.flatnonzero(np.isin(mccs, ["5816", "5999", "5310"]))
        self.big_online_pool = np.flatnonzero(np.isin(mccs, ["5999", "5310", "4511"]))

    def _cards(self) -> None:
        rng, n = self.rng, self.cfg.n_cards
        city_w = np.array([c[5] for c in CITIES])
        self.c_home = rng.choice(len(CITIES), size=n, p=city_w / city_w.sum())
        self.c_mean = rng.lognormal(math.log(35.0), 0.5, size=n)
        self.c_rate = np.clip(rng.lognormal(-0.245, 0.7, size=n), 0.3, 3.0)  # mean ~1 txn/day
        self.c_online = rng.beta(2.0, 4.0, size=n)
        self.c_ndev = 1 + (rng.random(n) < 0.4).astype(int)
        self.c_dev0 = np.concatenate([[0], np.cumsum(self.c_ndev)[:-1]])
        for _ in range(int(self.c_ndev.sum())):
            self.new_device()
        # A quarter of the cards take one trip: their card-present spending moves to another city.
        self.c_trip_city = (self.c_home + rng.integers(1, len(CITIES), size=n)) % len(CITIES)
        self.c_trip_start = np.where(rng.random(n) < 0.25, rng.integers(0, self.cfg.days, n), -99)
        self.c_trip_len = rng.integers(2, 7, size=n)

    def new_device(self) -> int:
        octets = self.rng.integers(0, 256, size=3).tolist()
        first = IP_FIRST_OCTETS[int(self.rng.integers(len(IP_FIRST_OCTETS)))]
        self.dev_ip.append(f"{first}.{octets[0]}.{octets[1]}.{max(octets[2], 1)}")
        return len(self.dev_ip) - 1

    def usual_device(self, card: int) -> int:
        second = self.c_ndev[card] > 1 and self.rng.random() < 0.25  # as in everyday spending
        return int(self.c_dev0[card] + second)

    def time_of_day(self, n: int) -> np.ndarray:
        hours = self.rng.choice(24, size=n, p=HOURLY / HOURLY.sum())
        return hours * HOUR_MS + self.rng.integers(0, HOUR_MS, size=n)

    def random_time(self, first_day: int = 0, tail_days: int = 0) -> int:
        """A seasonal time on a day in [first_day, days - tail_days) (at least first_day)."""
        day = int(self.rng.integers(first_day, max(first_day + 1, self.cfg.days - tail_days)))
        return self.start_ms + day * DAY_MS + int(self.time_of_day(1)[0])

    def amount(self, card: int, lo: float, hi: float) -> float:
        return float(self.c_mean[card] * self.rng.uniform(lo, hi))

    def pos_merchant(self, city: int, exclude: int = -1) -> int:
        pool = self.pos_pool[city, False]
        while True:
            m = int(pool.pick(self.rng.random(1))[0])
            if m != exclude or len(pool.ids) == 1:
                return m


def _legit(w: _World) -> tuple[list[Txn], np.ndarray]:
    """Everyday spending, card by card, vectorised within a card. Also returns the int columns
    (ts, card, merchant, online) that the patterns built on legit history search."""
    rng, days = w.rng, w.cfg.days
    start_dow = datetime.fromtimestamp(w.start_ms / 1000, tz=UTC).weekday()
    day_dow = (start_dow + np.arange(days)) % 7
    day_p = WEEKDAY[day_dow] / WEEKDAY[day_dow].sum()
    cols: list[list] = [[] for _ in range(6)]
    for c in range(w.cfg.n_cards):
        n = int(rng.poisson(w.c_rate[c] * days))
        day = np.sort(rng.choice(days, size=n, p=day_p))
        ts = w.start_ms + day * DAY_MS + w.time_of_day(n)
        online = rng.random(n) < w.c_online[c]
        weekend = day_dow[day] >= 5
        on_trip = (day >= w.c_trip_start[c]) & (day < w.c_trip_start[c] + w.c_trip_len[c])
        city = np.where(on_trip, w.c_trip_city[c], w.c_home[c])
        u = rng.random(n)
        merchant = np.zeros(n, dtype=np.int64)
        for wk in (False, True):
            sel = online & (weekend == wk)
            merchant[sel] = w.online_pool[wk].pick(u[sel])
            for ct in np.unique(city[~online & (weekend == wk)]).tolist():
                sel = ~online & (weekend == wk) & (city == ct)
                merchant[sel] = w.pos_pool[ct, wk].pick(u[sel])
        second = rng.random(n) < 0.25
        dev = np.where(online, w.c_dev0[c] + (second & (w.c_ndev[c] > 1)), -1)
        amount = np.maximum(w.c_mean[c] * w.m_scale[merchant] * rng.lognormal(0, 0.5, n), 0.5)
        for col, arr in zip(cols, (ts, [c] * n, merchant, amount, online, dev), strict=True):
            col.extend(arr.tolist() if isinstance(arr, np.ndarray) else arr)
    txns: list[Txn] = [(*row, None) for row in zip(*cols, strict=True)]
    arr = np.array([cols[0], cols[1], cols[2], cols[4]], dtype=np.int64).T.reshape(-1, 4)
    return txns, arr


def _card_testing(w: _World, n: int) -> Iterator[Txn]:
    """Bursts of tiny amounts at many online merchants, sometimes cashed in with one big buy."""
    for _ in range(n):
        card, dev, t = int(w.rng.integers(w.cfg.n_cards)), w.new_device(), w.random_time()
        k = min(int(w.rng.integers(5, 21)), len(w.testing_pool))
        for m in w.rng.choice(w.testing_pool, size=k, replace=False).tolist():
            t += int(w.rng.integers(2_000, 20_000))
            yield t, card, m, float(w.rng.uniform(0.5, 5.0)), True, dev, "card_testing"
        if w.rng.random() < 0.5:
            t += int(w.rng.integers(5, 60)) * MINUTE_MS
            m = int(w.rng.choice(w.big_online_pool))
            yield t, card, m, w.amount(card, 5, 12), True, dev, "card_testing"


def _account_takeover(w: _World, n: int) -> Iterator[Txn]:
    """A never-seen device and ip, a normal-looking first buy, then several large ones."""
    for _ in range(n):
        card, dev, t = int(w.rng.integers(w.cfg.n_cards)), w.new_device(), w.random_time()
        m = int(w.rng.choice(w.big_online_pool))
        yield t, card, m, w.amount(card, 0.5, 1.5), True, dev, "account_takeover"
        k = int(w.rng.integers(2, 6))
        for dt in np.sort(w.rng.integers(10 * MINUTE_MS, 6 * HOUR_MS, size=k)).tolist():
            m = int(w.rng.choice(w.big_online_pool))
            yield t + dt, card, m, w.amount(card, 3, 8), True, dev, "account_takeover"


def _compromised_merchant(w: _World, budget: int, legit: np.ndarray) -> Iterator[Txn]:
    """Skimmed at a breached shop; the stolen cards are used 3-20 days later elsewhere."""
    ts, card_of, merch = legit[:, 0], legit[:, 1], legit[:, 2]
    pos = np.flatnonzero(~w.m_online)
    popular = pos[np.argsort(-w.m_pop[pos], kind="stable")][: max(3, len(pos) // 3)]
    made = 0
    for m in w.rng.permutation(popular).tolist():
        if made >= budget:
            return
        w0 = w.start_ms + int(w.rng.integers(0, max(1, w.cfg.days - 5))) * DAY_MS
        w1 = w0 + int(w.rng.integers(5, 11)) * DAY_MS
        sel = (merch == m) & (ts >= w0) & (ts < w1)
        cards, first = np.unique(card_of[sel], return_index=True)
        visit = ts[sel][first]
        for i in w.rng.permutation(len(cards)).tolist():
            if made >= budget or w.rng.random() > 0.45:
                continue
            card = int(cards[i])
            online = bool(w.rng.random() < 0.5)
            dev = w.new_device() if online else -1
            t = int(visit[i]) + int(w.rng.uniform(3, 20) * DAY_MS)
            for _ in range(int(w.rng.integers(1, 4))):
                if t >= w.end_ms:  # not yet happened within the period: don't count it
                    break
                if online:
                    shop = int(w.rng.choice(w.big_online_pool))
                else:
                    shop = w.pos_merchant(int(w.c_home[card]), exclude=m)
                yield t, card, shop, w.amount(card, 1.5, 4), online, dev, "compromised_merchant"
                made += 1
                t += int(w.rng.integers(30 * MINUTE_MS, 36 * HOUR_MS))


def _inflated_spending(w: _World, n: int) -> Iterator[Txn]:
    """A cloned card spends 4-10x its usual mean in home-city shops over a day or two."""
    for _ in range(n):
        card, t = int(w.rng.integers(w.cfg.n_cards)), w.random_time(tail_days=2)
        k = int(w.rng.integers(3, 9))
        span = int(w.rng.uniform(1, 2) * DAY_MS)
        for dt in [0, *np.sort(w.rng.integers(0, span, size=k - 1)).tolist()]:
            m = w.pos_merchant(int(w.c_home[card]))
            yield t + dt, card, m, w.amount(card, 4, 10), False, -1, "inflated_spending"


def _impossible_travel(w: _World, n: int, legit: np.ndarray) -> Iterator[Txn]:
    """A card-present buy > 1000 km away from the card's previous card-present buy, < 2 h later."""
    pos_rows = np.flatnonzero((legit[:, 3] == 0) & (legit[:, 0] < w.end_ms - 2 * HOUR_MS))
    far = {
        a: [b for b in range(len(CITIES)) if _haversine_km(CITIES[a][3:5], CITIES[b][3:5]) > 1000]
        for a in range(len(CITIES))
    }
    for row in w.rng.choice(pos_rows, size=min(n, len(pos_rows)), replace=False).tolist():
        t, card, m = (int(x) for x in legit[row, :3])
        city = int(w.rng.choice(far[int(w.m_city[m])]))
        t += int(w.rng.integers(10, 110)) * MINUTE_MS
        yield t, card, w.pos_merchant(city), w.amount(card, 1, 3), False, -1, "impossible_travel"


def _merchant_cashout(w: _World, n: int, first_day: int) -> Iterator[Txn]:
    """Drift: ordinary amounts at a few rarely-used cash-like merchants, from the card's own
    devices, several per card over a few days. None of the base patterns' signatures apply."""
    for _ in range(n):
        card, t = int(w.rng.integers(w.cfg.n_cards)), w.random_time(first_day)
        k = int(w.rng.integers(3, 7))
        span = int(w.rng.uniform(1, 4) * DAY_MS)
        for dt in [0, *np.sort(w.rng.integers(0, span, size=k - 1)).tolist()]:
            m = int(w.rng.choice(w.cashout))
            dev = w.usual_device(card)
            yield t + dt, card, m, w.amount(card, 1, 2), True, dev, w.cfg.drift_pattern


def _compromised_terminal(
    w: _World, budget: int, legit: np.ndarray, taken: dict[int, tuple[str, float]]
) -> None:
    """A busy merchant's terminal or checkout is compromised for weeks: each transaction made
    there in that window is fraud with an incident-wide probability. Existing transactions are
    relabelled (nothing else changes), so only the merchant's recent fraud rate gives it away.
    Whole incidents are added until the budget is reached (the last one may overshoot it)."""
    ts, merch = legit[:, 0], legit[:, 2]
    visits = np.bincount(merch, minlength=w.cfg.n_merchants)
    busy = np.argsort(-visits, kind="stable")[: max(1, w.cfg.n_merchants // 2)]
    made = 0
    for m in w.rng.permutation(busy[visits[busy] > 0]).tolist():
        if made >= budget:
            return
        length = int(w.rng.integers(14, 36))
        w0 = w.start_ms + int(w.rng.integers(0, max(1, w.cfg.days - length + 1))) * DAY_MS
        p = float(w.rng.uniform(0.3, 0.7))
        rows = np.flatnonzero((merch == m) & (ts >= w0) & (ts < w0 + length * DAY_MS))
        for row in rows[w.rng.random(len(rows)) < p].tolist():
            if row not in taken:
                taken[row] = ("compromised_terminal", 1.0)
                made += 1


def _compromised_card(w: _World, budget: int, legit: np.ndarray, taken: dict[int, tuple[str, float]]) -> None:
    """A card's details are used for a few days alongside its owner: about a third of the card's
    own transactions in the window are fraud, with amounts inflated 3-6x (existing transactions
    are relabelled and inflated). Each card is compromised at most once; one with no transactions
    in its window is passed over."""
    ts, card_of = legit[:, 0], legit[:, 1]
    made = 0
    for card in w.rng.permutation(w.cfg.n_cards).tolist():
        if made >= budget:
            return
        length = int(w.rng.integers(3, 15))
        w0 = w.start_ms + int(w.rng.integers(0, max(1, w.cfg.days - length + 1))) * DAY_MS
        rows = np.flatnonzero((card_of == card) & (ts >= w0) & (ts < w0 + length * DAY_MS))
        if not len(rows):
            continue
        hit, factor = w.rng.random(len(rows)) < 1 / 3, w.rng.uniform(3, 6, len(rows))
        for row, f in zip(rows[hit].tolist(), factor[hit].tolist(), strict=True):
            if row not in taken:
                taken[row] = ("compromised_card", f)
                made += 1


def _large_amount(w: _World, n: int) -> Iterator[Txn]:
    """One large buy on a card at an ordinary time and place (home-city shop, or online from the
    card's usual device): only the amount is out of line."""
    for _ in range(n):
        card, t = int(w.rng.integers(w.cfg.n_cards)), w.random_time()
        amount = max(300.0, w.amount(card, 8, 20))
        if w.rng.random() < 0.5:
            m, dev = int(w.rng.choice(w.big_online_pool)), w.usual_device(card)
            yield t, card, m, amount, True, dev, "large_amount"
        else:
            yield t, card, w.pos_merchant(int(w.c_home[card])), amount, False, -1, "large_amount"


def _fraud(w: _World, n_legit: int, legit: np.ndarray) -> tuple[list[Txn], dict[int, tuple[str, float]]]:
    """All fraud, sized so that the overall fraud share lands near `fraud_rate_target`: the new
    transactions, and the legit rows to relabel as fraud (row -> (pattern, amount factor))."""
    cfg = w.cfg
    total = cfg.fraud_rate_target * n_legit / (1 - cfg.fraud_rate_target)
    post = (cfg.days - cfg.drift_day) / cfg.days if cfg.drift_on and cfg.drift_day else 0.0
    ratio = _DRIFT_SHARE_OF_POST / (1 - _DRIFT_SHARE_OF_POST)
    base = total / (1 + ratio * post)
    shares = cfg.mix_weights()

    def count(p: str) -> int:
        size = _BASE_SHARES[p][1] if p in _BASE_SHARES else _EXTRA_SIZES[p]
        return max(1, round(shares[p] * base / size)) if size else max(1, round(shares[p] * base))

    out: list[Txn] = []
    relabel: dict[int, tuple[str, float]] = {}
    for p in shares:
        if p == "card_testing":
            out += _card_testing(w, count(p))
        elif p == "account_takeover":
            out += _account_takeover(w, count(p))
        elif p == "compromised_merchant":
            out += _compromised_merchant(w, count(p), legit)
        elif p == "inflated_spending":
            out += _inflated_spending(w, count(p))
        elif p == "impossible_travel":
            out += _impossible_travel(w, count(p), legit)
        elif p == "compromised_terminal":
            _compromised_terminal(w, count(p), legit, relabel)
        elif p == "compromised_card":
            _compromised_card(w, count(p), legit, relabel)
        elif p == "large_amount":
            out += _large_amount(w, count(p))
    if cfg.drift_on and cfg.drift_day is not None:
        out += _merchant_cashout(w, max(1, round(ratio * base * post / _DRIFT_SIZE)), cfg.drift_day)
    return [t for t in out if w.start_ms <= t[0] < w.end_ms], relabel


def generate(config: GeneratorConfig) -> tuple[list[dict], list[dict]]:
    """Returns (transactions, labels), each sorted by event time (ts), as plain JSON-ready dicts.

    Transaction ids are assigned in ts order. Legit transactions carry no `pattern` key; absent
    values (device_id/ip for card-present, lat/lon for online) are omitted rather than null. With
    `minimal`, records keep only the contract's required fields (and `pattern`).
    """
    start = _start_ms(config.start)
    w = _World(config, np.random.default_rng(config.seed), start)
    legit, cols = _legit(w)
    fraud, relabel = _fraud(w, len(legit), cols)
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
