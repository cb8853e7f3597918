"""Deterministic synthetic card transactions and delayed fraud labels.

Why: the pipeline needs realistic, reproducible data to train on, replay through the flow and
benchmark against, without shipping real card data. What: cards with spending profiles and a
home city, merchants with an MCC category and a location, daily and weekly seasonality, five
classic fraud patterns plus one late "drift" pattern that appears only from `drift_day` on (so a
model trained before it has never seen it), and labels that arrive days after the transaction.

Everything is drawn from one `numpy.random.default_rng(seed)` in a fixed order, so the same
config always yields byte-identical files. Only numpy and the standard library are used.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

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

    @property
    def patterns(self) -> tuple[str, ...]:
        return (*BASE_PATTERNS, self.drift_pattern)


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


def _fraud(w: _World, n_legit: int, legit: np.ndarray) -> list[Txn]:
    """All fraud, sized so that the overall fraud share lands near `fraud_rate_target`."""
    cfg = w.cfg
    total = cfg.fraud_rate_target * n_legit / (1 - cfg.fraud_rate_target)
    drift_on = cfg.drift_day is not None and cfg.drift_day < cfg.days
    post = (cfg.days - cfg.drift_day) / cfg.days if drift_on and cfg.drift_day else 0.0
    ratio = _DRIFT_SHARE_OF_POST / (1 - _DRIFT_SHARE_OF_POST)
    base = total / (1 + ratio * post)

    def count(p: str) -> int:
        share, size = _BASE_SHARES[p]
        return max(1, round(share * base / size))

    out: list[Txn] = []
    out += _card_testing(w, count("card_testing"))
    out += _account_takeover(w, count("account_takeover"))
    cm_budget = max(1, round(_BASE_SHARES["compromised_merchant"][0] * base))
    out += _compromised_merchant(w, cm_budget, legit)
    out += _inflated_spending(w, count("inflated_spending"))
    out += _impossible_travel(w, count("impossible_travel"), legit)
    if drift_on and cfg.drift_day is not None:
        out += _merchant_cashout(w, max(1, round(ratio * base * post / _DRIFT_SIZE)), cfg.drift_day)
    return [t for t in out if w.start_ms <= t[0] < w.end_ms]


def generate(config: GeneratorConfig) -> tuple[list[dict], list[dict]]:
    """Returns (transactions, labels), each sorted by event time (ts), as plain JSON-ready dicts.

    Transaction ids are assigned in ts order. Legit transactions carry no `pattern` key; absent
    values (device_id/ip for card-present, lat/lon for online) are omitted rather than null.
    """
    start = _start_ms(config.start)
    w = _World(config, np.random.default_rng(config.seed), start)
    legit, cols = _legit(w)
    txns = legit + _fraud(w, len(legit), cols)
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
        if pattern is not None:
            rec["pattern"] = pattern
        records.append(rec)

    # Labels: chargebacks after a lognormal delay, genuine confirmations after a fixed delay.
    fraud = np.array([txns[i][6] is not None for i in order])
    ts_arr = np.array([txns[i][0] for i in order], dtype=np.int64)
    cb = np.clip(w.rng.lognormal(math.log(config.label_delay_days_median), 0.75, len(order)), 0.5, 45)
    ok = config.legit_label_delay_days + w.rng.uniform(0, 6 / 24, len(order))
    label_ts = ts_arr + np.round(np.where(fraud, cb, ok) * DAY_MS).astype(np.int64)
    keep = np.flatnonzero(label_ts < w.end_ms)
    keep = keep[np.lexsort((keep, label_ts[keep]))]
    labels = [
        {
            "txn_id": records[j]["txn_id"],
            "is_fraud": bool(fraud[j]),
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
