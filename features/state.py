"""Per-key event-time state and the exact look-back aggregations over it.

An `EntityState` keeps one key's events inside the retention horizon (longest window + label
delay + allowed lateness), sorted by event time, in flat typed arrays: compact in memory and cheap
to snapshot. `EntityPlan.observe` inserts a transaction at its event-time position and computes
each declared feature over (t - window, t], the transaction itself included, from the events that
arrived before it. Events that arrived earlier but lie later in event time are not in its window.
Unwindowed aggregations (time since last, distance and speed from the previous located event) look
back as far as the entity's longest window.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from bisect import bisect_right
from typing import Any

from features.events import Transaction
from features.spec import CATEGORICAL_AGGS, LABEL_AGGS, NUMERIC_AGGS, Entity, WindowFeature

NAN = float("nan")
MINUTE_H = 1 / 60


def stable_hash(value: str) -> int:
    """A 64-bit hash that is the same in every process (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little", signed=True)


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(a)))


class EntityState:
    """Events of one key: event times, numeric and hashed categorical columns, fraud labels."""

    __slots__ = ("cat", "lab_label_ts", "lab_txn_ts", "max_ts", "num", "ts")

    def __init__(self, n_num: int, n_cat: int) -> None:
        self.ts = array("q")
        self.num = [array("d") for _ in range(n_num)]
        self.cat = [array("q") for _ in range(n_cat)]
        self.lab_txn_ts = array("q")
        self.lab_label_ts = array("q")
        self.max_ts = -(2**62)

    def __len__(self) -> int:
        return len(self.ts)

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.ts, self.num, self.cat, self.lab_txn_ts, self.lab_label_ts, self.max_ts)

    def __setstate__(self, s: tuple[Any, ...]) -> None:
        self.ts, self.num, self.cat, self.lab_txn_ts, self.lab_label_ts, self.max_ts = s

    def is_empty(self) -> bool:
        return not self.ts and not self.lab_txn_ts


class EntityPlan:
    """How one entity's declared features are stored and computed."""

    def __init__(self, entity: Entity, features: tuple[WindowFeature, ...], allowed_lateness_ms: int) -> None:
        self.entity = entity
        self.features = features
        self.names = [f.name for f in features]
        geo = any(f.agg in ("distance_km", "speed_kmh") for f in features)
        num = sorted(
            {f.field for f in features if f.agg in NUMERIC_AGGS and f.field}
            | ({"lat", "lon"} if geo else set())
        )
        cat = sorted({f.field for f in features if f.agg in CATEGORICAL_AGGS and f.field})
        self.num_fields, self.cat_fields = num, cat
        self.uses_labels = any(f.agg in LABEL_AGGS for f in features)
        self.lookback_ms = max(f.window_ms + f.delay_ms for f in features)
        self.retention_ms = self.lookback_ms + allowed_lateness_ms
        self.allowed_lateness_ms = allowed_lateness_ms
        self._steps = [(f.agg, self._column(f), f.window_ms, f.delay_ms) for f in features]
        self._lat = num.index("lat") if geo else -1
        self._lon = num.index("lon") if geo else -1

    def _column(self, f: WindowFeature) -> int:
        """Index of the feature's source column among the numeric or categorical ones, else -1."""
        if f.field is None:
            return -1
        return (self.num_fields if f.agg in NUMERIC_AGGS else self.cat_fields).index(f.field)

    def new_state(self) -> EntityState:
        return EntityState(len(self.num_fields), len(self.cat_fields))

    def key_of(self, txn: Transaction) -> str | None:
        """The state key of `txn` for this entity, or None when a key field is missing."""
        parts = [getattr(txn, f) for f in self.entity.fields]
        if any(p is None or p == "" for p in parts):
            return None
        return f"{self.entity.name}:{'|'.join(parts)}"

    def _row(self, txn: Transaction) -> tuple[list[float], list[int]]:
        nums = [NAN if (v := getattr(txn, f)) is None else float(v) for f in self.num_fields]
        cats = [0 if (v := getattr(txn, f)) is None else stable_hash(v) for f in self.cat_fields]
        return nums, cats

    def observe(self, state: EntityState, txn: Transaction) -> tuple[list[float], bool]:
        """Add `txn` to `state`; return its feature values and whether it arrived too late to be exact."""
        t = txn.ts_ms
        nums, cats = self._row(txn)
        late = t < state.max_ts - self.allowed_lateness_ms
        ts = state.ts
        idx = bisect_right(ts, t)
        ts.insert(idx, t)
        for col, v in zip(state.num, nums, strict=True):
            col.insert(idx, v)
        for ccol, c in zip(state.cat, cats, strict=True):
            ccol.insert(idx, c)
        values = self._compute(state, idx, t, nums, cats)
        if t > state.max_ts:
            state.max_ts = t
        self._evict(state)
        return values, late

    def observe_label(self, state: EntityState, txn_ts: int, label_ts: int) -> None:
        """Record a fraud label (known from `label_ts`) on a transaction of this key at `txn_ts`."""
        if not self.uses_labels:
            return
        i = bisect_right(state.lab_txn_ts, txn_ts)
        state.lab_txn_ts.insert(i, txn_ts)
        state.lab_label_ts.insert(i, label_ts)

    def _evict(self, state: EntityState) -> None:
        horizon = state.max_ts - self.retention_ms
        n = bisect_right(state.ts, horizon)
        if n:
            del state.ts[:n]
            for col in state.num:
                del col[:n]
            for ccol in state.cat:
                del ccol[:n]
        m = bisect_right(state.lab_txn_ts, horizon)
        if m:
            del state.lab_txn_ts[:m]
            del state.lab_label_ts[:m]

    def _compute(self, s: EntityState, idx: int, t: int, nums: list[float], cats: list[int]) -> list[float]:
        ts = s.ts
        end = idx + 1  # the window slice [start, end) ends with this transaction
        starts: dict[int, int] = {}
        out: list[float] = []
        for agg, col, w, delay in self._steps:
            if w and not delay and w not in starts:
                starts[w] = bisect_right(ts, t - w, 0, idx)
            if agg == "count":
                out.append(float(end - starts[w]))
            elif agg in NUMERIC_AGGS:
                vals = [v for v in s.num[col][starts[w] : end] if v == v]
                out.append(_numeric(agg, vals, nums[col]))
            elif agg == "distinct":
                out.append(float(len({c for c in s.cat[col][starts[w] : end] if c})))
            elif agg == "is_new":
                c = cats[col]
                out.append(NAN if not c else float(c not in s.cat[col][starts[w] : idx]))
            elif agg == "time_since_last":
                out.append((t - ts[idx - 1]) / 1000.0 if idx and ts[idx - 1] > t - self.lookback_ms else NAN)
            elif agg in ("distance_km", "speed_kmh"):
                out.append(self._geo(s, idx, t, nums, agg))
            else:
                out.append(_label_feature(s, agg, t, w, delay))
        return out

    def _geo(self, s: EntityState, idx: int, t: int, nums: list[float], agg: str) -> float:
        lat, lon = nums[self._lat], nums[self._lon]
        if lat != lat:
            return NAN
        lats, lons, ts = s.num[self._lat], s.num[self._lon], s.ts
        oldest = t - self.lookback_ms
        for i in range(idx - 1, -1, -1):
            if ts[i] <= oldest:
                break
            if lats[i] == lats[i]:
                km = haversine_km(lats[i], lons[i], lat, lon)
                if agg == "distance_km":
                    return km
                return km / max((t - ts[i]) / 3_600_000, MINUTE_H)
        return NAN


def _numeric(agg: str, vals: list[float], current: float) -> float:
    if not vals:
        return NAN
    n = len(vals)
    if agg == "sum":
        return float(sum(vals))
    if agg == "min":
        return min(vals)
    if agg == "max":
        return max(vals)
    mean = sum(vals) / n
    if agg == "mean":
        return mean
    if agg == "ratio_to_mean":
        return current / mean if mean > 0 else NAN
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n)
    if agg == "std":
        return std
    return (current - mean) / std if std > 0 else NAN  # zscore


def _label_feature(s: EntityState, agg: str, t: int, w: int, delay: int) -> float:
    """Fraud labels known by t on this key's transactions in (t - delay - w, t - delay]."""
    hi, lo = t - delay, t - delay - w
    a, b = bisect_right(s.lab_txn_ts, lo), bisect_right(s.lab_txn_ts, hi)
    frauds = sum(1 for i in range(a, b) if s.lab_label_ts[i] <= t)
    if agg == "label_count":
        return float(frauds)
    txns = bisect_right(s.ts, hi) - bisect_right(s.ts, lo)
    return frauds / txns if txns else NAN
