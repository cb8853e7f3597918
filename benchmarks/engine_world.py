"""The feature engine benchmark's synthetic world, its feature set, and the engine timed over it.

Synthetic data is drawn with numpy (not `fraud.datagen`, which is built for realism, not millions of
events): cards uniform, merchants Zipf-like (weight 1/rank^s), devices (each card has 1 or 2, about
40% of transactions carry one), lognormal amounts rounded to cents, Poisson arrivals at R per card
per day. Timestamps are made unique (ties nudged by 1 ms) so that pandas and the engine see the
same order for events of the same millisecond. Light on purpose (numpy and `features` only): the
memory figures are of the process that imports it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.common import DAY_MS, START_MS
from features.buffer import EntityState
from features.engine import FeatureEngine, FeaturePipeline
from features.events import Transaction
from features.spec import Entity, FeatureSet, WindowFeature, expand

if TYPE_CHECKING:
    pass


# ------------------------------------------------------------------------------------ feature set


CARD = Entity("card", ("card_id",))
MERCHANT = Entity("merchant", ("merchant_id",))
DEVICE = Entity("device", ("device_id",))

BENCH = FeatureSet(
    windows=(
        *expand(CARD, ["count"], ["1h", "24h", "7d", "30d"]),
        *expand(CARD, ["sum", "mean", "max"], ["1h", "24h", "7d", "30d"], field="amount"),
        WindowFeature(CARD, "time_since_last"),
        *expand(MERCHANT, ["count"], ["1h", "24h"]),
        WindowFeature(MERCHANT, "mean", "amount", "7d"),
        WindowFeature(DEVICE, "count", window="24h"),
        WindowFeature(DEVICE, "distinct", "card_id", "24h"),
    )
)
# What the pandas comparison computes (card and merchant features), grouped by entity.


# --------------------------------------------------------------------------------------------- data


@dataclass
class Stream:
    """Events as numpy columns, in time order; device -1 = none."""

    ts: np.ndarray
    card: np.ndarray
    merchant: np.ndarray
    device: np.ndarray
    amount: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    def slice(self, lo: int, hi: int) -> Stream:
        return Stream(
            self.ts[lo:hi], self.card[lo:hi], self.merchant[lo:hi], self.device[lo:hi], self.amount[lo:hi]
        )


class World:
    """Cards, merchants and devices, and how to draw events for them."""

    def __init__(self, rng: np.random.Generator, cards: int, merchants: int, devices: int, zipf: float):
        self.rng = rng
        self.cards, self.merchants, self.devices = cards, merchants, devices
        w = 1.0 / np.arange(1, merchants + 1, dtype=np.float64) ** zipf
        self.merchant_share = w / w.sum()
        self.merchant_cdf = np.cumsum(self.merchant_share)
        self.card_devices = rng.integers(0, devices, size=(cards, 2))
        self.card_two_devices = rng.random(cards) < 0.5
        # Ids are strings made per transaction ("c17", "m3", "d42"), as a source decoding a stream
        # makes them: tables of a million id strings would weigh on the process's memory.

    def events(self, ts: np.ndarray, card: np.ndarray) -> Stream:
        n, rng = len(ts), self.rng
        merchant = np.minimum(
            np.searchsorted(self.merchant_cdf, rng.random(n), side="right"), self.merchants - 1
        )
        second = self.card_two_devices[card] & (rng.random(n) < 0.5)
        device = np.where(second, self.card_devices[card, 1], self.card_devices[card, 0])
        device = np.where(rng.random(n) < 0.4, device, -1)
        amount = np.maximum(np.round(rng.lognormal(np.log(40.0), 1.0, n), 2), 0.01)
        return Stream(ts.astype(np.int64), card, merchant, device, amount)

    def transactions(self, s: Stream, first_id: int = 0) -> list[Transaction]:
        T = Transaction
        cols = zip(
            s.ts.tolist(),
            s.card.tolist(),
            s.merchant.tolist(),
            s.device.tolist(),
            s.amount.tolist(),
            strict=True,
        )
        return [
            T(f"t{first_id + i}", ts, f"c{c}", f"m{m}", a, device_id=f"d{d}" if d >= 0 else None)
            for i, (ts, c, m, d, a) in enumerate(cols)
        ]


def poisson_stream(world: World, days: int, rate: float) -> Stream:
    """Independent Poisson arrivals at `rate` per card per day = one Poisson process over all cards
    with uniformly drawn cards. Times are made strictly increasing (a tie moves 1 ms later)."""
    rng = world.rng
    n = int(rng.poisson(world.cards * days * rate))
    u = np.sort(rng.integers(0, days * DAY_MS, n))
    i = np.arange(n, dtype=np.int64)
    ts = np.maximum.accumulate(u - i) + i + START_MS
    return world.events(ts, rng.integers(0, world.cards, n))


# --------------------------------------------------------------------------------------- throughput


def feed(
    pipeline: FeaturePipeline, txns: Sequence[Transaction], keep_index: bool = False
) -> tuple[float, FeatureEngine]:
    """Features only: the txn_id index (label joins, duplicate detection) is off unless `keep_index`."""
    engine = FeatureEngine(pipeline, index_ttl_ms=None if keep_index else 0)
    process = engine.process
    t0 = time.perf_counter()
    for t in txns:
        process(t)
    return time.perf_counter() - t0, engine


def entity_breakdown(pipeline: FeaturePipeline, txns: Sequence[Transaction]) -> dict[str, float]:
    """µs per transaction of each entity's features alone (key, state lookup, observe) and of the
    transaction-only features: where the time of a full run goes."""
    out: dict[str, float] = {}
    for plan in pipeline.plans:
        states: dict[str, EntityState] = {}
        key_of, observe, new_state = plan.key_of, plan.observe_fn, plan.new_state
        gc.collect()
        t0 = time.perf_counter()
        for t in txns:
            key = key_of(t)
            if key is None:
                continue
            state = states.get(key)
            if state is None:
                state = states[key] = new_state()
            observe(state, t)
        out[plan.entity.name] = (time.perf_counter() - t0) / len(txns) * 1e6
    txn_features = pipeline.txn_features
    t0 = time.perf_counter()
    for t in txns:
        txn_features(t)
    out["transaction-only"] = (time.perf_counter() - t0) / len(txns) * 1e6
    return out


def feed_collect(pipeline: FeaturePipeline, txns: Sequence[Transaction]) -> tuple[float, list[list[float]]]:
    engine = FeatureEngine(pipeline, index_ttl_ms=0)
    process = engine.process
    values: list[list[float]] = []
    append = values.append
    t0 = time.perf_counter()
    for t in txns:
        append(process(t).values)  # type: ignore[union-attr]
    return time.perf_counter() - t0, values
