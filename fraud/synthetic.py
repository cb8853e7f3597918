"""The synthetic population the generator draws from: cities, merchant categories, cards with
their spending profiles and devices, merchants with their popularity, and everyday (legit)
spending. Drawn once from the generator's rng, in a fixed order (`fraud.datagen` says why).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fraud.datagen import GeneratorConfig

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

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


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (*a, *b))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


class MerchantPool:
    """Merchants to pick from with popularity weights (inverse-CDF over fixed arrays)."""

    def __init__(self, ids: np.ndarray, weights: np.ndarray) -> None:
        self.ids = ids
        self.cum = np.cumsum(weights) / weights.sum()

    def pick(self, u: np.ndarray) -> np.ndarray:
        return self.ids[np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.ids) - 1)]


# A transaction before ids and formatting: (ts_ms, card, merchant, amount, online, device, pattern)
Txn = tuple[int, int, int, float, bool, int, str | None]


class SyntheticWorld:
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
        self.online_pool = [MerchantPool(on_ids, self.m_pop[on_ids] * (weekend[on_ids] if w else 1.0))
                            for w in (False, True)]  # fmt: skip
        self.pos_pool: dict[tuple[int, bool], MerchantPool] = {}
        for city in range(len(CITIES)):
            ids = np.flatnonzero(~online & (self.m_city == city))
            for w in (False, True):
                self.pos_pool[city, w] = MerchantPool(ids, self.m_pop[ids] * (weekend[ids] if w else 1.0))
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


def everyday_spending(w: SyntheticWorld) -> tuple[list[Txn], np.ndarray]:
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
