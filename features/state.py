"""Per-key event-time state and the exact look-back aggregations over it.

An `EntityState` keeps one key's events inside the retention horizon (longest window + label
delay + allowed lateness), sorted by event time, in flat typed arrays: event times as 32-bit
millisecond offsets from a per-key base, amounts as 32-bit integer cents (exactly the float that
arrived; a key falls back to float64 the first time a value is not a whole number of cents),
categorical values as 32-bit hashes. A card with 90 events in 30 days fits in under 1 KB, and the
snapshot is a handful of byte buffers.

`EntityPlan.observe` inserts a transaction at its event-time position and computes each declared
feature over (t - window, t], the transaction itself included, from the events that arrived before
it; events that arrived earlier but lie later in event time are not in its window. Counts come from
a binary search; sums and means of long (hot) keys from prefix sums kept once a key holds
`PREFIX_MIN` events; other aggregations scan the window. Unwindowed aggregations (time since last,
distance and speed from the previous located event) look back as far as the entity's longest window.
"""

from __future__ import annotations

import math
import sys
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable
from itertools import accumulate
from operator import attrgetter
from typing import Any

from features.events import Transaction
from features.spec import CATEGORICAL_AGGS, LABEL_AGGS, NUMERIC_AGGS, Entity, WindowFeature

NAN = float("nan")
MINUTE_H = 1 / 60
OFFSET_LIMIT = 2**32  # event-time offsets are unsigned 32-bit milliseconds (49.7 days)
CENTS_LIMIT = 2**31
PREFIX_MIN = 128  # keys this long keep prefix sums: O(1) window sums for hot merchants


def stable_hash(value: str) -> int:
    """A non-zero 32-bit hash that is the same in every process (Python's `hash` is salted)."""
    return zlib.crc32(value.encode()) or 1


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(a)))


def _cents(v: float) -> int | None:
    """`v` as integer cents when that is exact and fits 32 bits, else None."""
    if v != v or v in (math.inf, -math.inf):
        return None
    c = round(v * 100)
    return c if c / 100 == v and -CENTS_LIMIT < c < CENTS_LIMIT else None


class EntityState:
    """Events of one key: `ts` offsets from `base`, one array per column, fraud labels.

    `cols` holds numeric columns ('i' cents or 'd' floats) then categorical hashes ('I');
    `prefix` (derived, not snapshotted) holds running sums of the summed numeric columns;
    `labels` is None until the key's first fraud label: (transaction times, label times).
    """

    __slots__ = ("base", "cols", "labels", "prefix", "ts")

    def __init__(self, ts_code: str, col_codes: tuple[str, ...]) -> None:
        self.base = 0
        self.ts = array(ts_code)
        self.cols: tuple[array[Any], ...] = tuple(array(c) for c in col_codes)
        self.prefix: dict[int, array[int]] | None = None
        self.labels: tuple[array[int], array[int]] | None = None

    def __len__(self) -> int:
        return len(self.ts)

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.base, self.ts, self.cols, self.labels)

    def __setstate__(self, s: tuple[Any, ...]) -> None:
        self.base, self.ts, self.cols, self.labels = s
        self.prefix = None

    def snapshot(self) -> tuple[Any, ...]:
        """An immutable copy (Bytewax may pickle it after the state has changed again)."""
        labels = None if self.labels is None else (self.labels[0][:], self.labels[1][:])
        return (self.base, self.ts[:], tuple(c[:] for c in self.cols), labels)

    @property
    def max_ts(self) -> int:
        return self.base + self.ts[-1] if self.ts else -(2**62)


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
        self.fields = [*num, *cat]
        self.col_codes = tuple("d" if f in ("lat", "lon") else "i" for f in num) + ("I",) * len(cat)
        self.summed = sorted({num.index(f.field) for f in features if f.agg in ("sum", "mean") and f.field})
        self.uses_labels = any(f.agg in LABEL_AGGS for f in features)
        self.lookback_ms = max(f.window_ms + f.delay_ms for f in features)
        self.retention_ms = self.lookback_ms + allowed_lateness_ms
        self.allowed_lateness_ms = allowed_lateness_ms
        self.ts_code = "I" if self.retention_ms < OFFSET_LIMIT * 3 // 4 else "q"
        self.windows = sorted({f.window_ms for f in features if f.window_ms and not f.delay_ms})
        self._steps = [(f.agg, self._column(f), f.window_ms, f.delay_ms) for f in features]
        self._fast, self.observe = self._compile()  # type: ignore[method-assign]
        self._get: Callable[[Transaction], Any] = attrgetter(*entity.fields)
        self._single = len(entity.fields) == 1
        self._prefix = entity.name + ":"
        self._lat = num.index("lat") if geo else -1
        self._lon = num.index("lon") if geo else -1

    def _column(self, f: WindowFeature) -> int:
        """Index of the feature's source column in `EntityState.cols`, or -1."""
        if f.field is None:
            return -1
        return (
            self.num_fields.index(f.field)
            if f.agg in NUMERIC_AGGS
            else len(self.num_fields) + self.cat_fields.index(f.field)
        )

    def new_state(self) -> EntityState:
        return EntityState(self.ts_code, self.col_codes)

    def restore(self, snapshot: tuple[Any, ...]) -> EntityState:
        state = self.new_state()
        state.__setstate__(snapshot)
        return state

    def key_of(self, txn: Transaction) -> str | None:
        """The state key of `txn` for this entity, or None when a key field is missing."""
        if self._single:
            v = self._get(txn)
            return self._prefix + v if v else None
        parts = self._get(txn)
        if not all(parts):
            return None
        return self._prefix + "|".join(parts)

    def expired(self, state: EntityState, now_ms: int) -> bool:
        """True once the key's newest event has left every window (the key can be dropped)."""
        newest = state.max_ts
        if state.labels is not None and state.labels[0]:
            newest = max(newest, state.labels[0][-1])
        return newest <= now_ms - self.retention_ms

    # -- updates ---------------------------------------------------------------------------

    def observe(self, state: EntityState, txn: Transaction) -> tuple[list[float], bool]:
        """Add `txn` to `state`; return its feature values and whether it arrived too late to be exact.

        Replaced per instance by the compiled in-order append (see `_compile`), which falls back
        here for anything else: first event, out of order, re-basing, a non-cent amount.
        """
        return self._observe(state, txn)

    def _observe(self, state: EntityState, txn: Transaction) -> tuple[list[float], bool]:
        """The general insertion: any event time, any amount."""
        t = txn.ts_ms
        newest = state.max_ts
        late = t < newest - self.allowed_lateness_ms
        if not state.ts:
            state.base = t - self.allowed_lateness_ms if self.ts_code == "I" else 0
        elif t <= newest - self.retention_ms:  # older than everything kept: it can only see itself
            return self._observe(self.new_state(), txn)[0], True
        elif self.ts_code == "I" and t - state.base >= OFFSET_LIMIT:
            self._rebase(state, t - self.retention_ms)  # what falls below the new base is evicted below
        elif self.ts_code == "I" and t < state.base:
            self._rebase(state, t)
        rel = t - state.base
        ts = state.ts
        idx = bisect_right(ts, rel)
        appended = idx == len(ts)
        ts.insert(idx, rel)
        for j, f in enumerate(self.fields):
            self._insert(state, j, idx, getattr(txn, f))
        if state.prefix is not None:
            self._update_prefix(state, idx, appended)
        elif len(ts) >= PREFIX_MIN and self.summed:
            self._build_prefix(state)
        values = self._fast(state, idx, rel)
        self._evict(state)
        return values, late

    def observe_label(self, state: EntityState, txn_ts: int, label_ts: int) -> None:
        """Record a fraud label (known from `label_ts`) on a transaction of this key at `txn_ts`."""
        if not self.uses_labels:
            return
        if state.labels is None:
            state.labels = (array("q"), array("q"))
        txns, known = state.labels
        i = bisect_right(txns, txn_ts)
        txns.insert(i, txn_ts)
        known.insert(i, label_ts)

    def _insert(self, state: EntityState, j: int, idx: int, value: Any) -> None:
        col: array[Any] = state.cols[j]
        code = col.typecode
        if code == "I":
            col.insert(idx, 0 if value is None else stable_hash(value))
        elif code == "d":
            col.insert(idx, NAN if value is None else float(value))
        else:
            c = None if value is None else _cents(float(value))
            if c is None:  # not whole cents: this key's column becomes float64 for good
                col = array("d", (x / 100 for x in col))
                state.cols = (*state.cols[:j], col, *state.cols[j + 1 :])
                if state.prefix is not None:
                    state.prefix.pop(j, None)
                col.insert(idx, NAN if value is None else float(value))
            else:
                col.insert(idx, c)

    def _build_prefix(self, state: EntityState) -> None:
        state.prefix = {
            j: array("q", accumulate(state.cols[j], initial=0))
            for j in self.summed
            if state.cols[j].typecode == "i"
        }

    def _update_prefix(self, state: EntityState, idx: int, appended: bool) -> None:
        assert state.prefix is not None
        for j, p in state.prefix.items():
            col = state.cols[j]
            if appended:
                p.append(p[-1] + col[idx])
            else:  # out of order: recompute the running sums after the insertion point
                del p[idx + 1 :]
                sums = accumulate(col[idx:], initial=p[idx])
                next(sums)
                p.extend(sums)

    def _rebase(self, state: EntityState, new_base: int) -> None:
        shift = state.base - new_base
        state.ts = array("I", (max(0, x + shift) for x in state.ts))
        state.base = new_base

    def _evict(self, state: EntityState) -> None:
        horizon = state.max_ts - self.retention_ms
        n = bisect_right(state.ts, horizon - state.base)
        if n:
            del state.ts[:n]
            for col in state.cols:
                del col[:n]
            if state.prefix is not None:
                for p in state.prefix.values():
                    del p[:n]
        if state.labels is not None:
            m = bisect_right(state.labels[0], horizon)
            if m:
                del state.labels[0][:m]
                del state.labels[1][:m]

    # -- features ---------------------------------------------------------------------------

    def _compute(self, s: EntityState, idx: int, rel: int) -> list[float]:
        """The reference implementation, feature by feature (the compiled one is `_fast`)."""
        ts = s.ts
        starts = {w: bisect_right(ts, rel - w, 0, idx) for w in self.windows}
        return [self._feature(s, idx, rel, starts.get(w, 0), agg, j, w, d) for agg, j, w, d in self._steps]

    def _feature(
        self, s: EntityState, idx: int, rel: int, start: int, agg: str, j: int, w: int, delay: int
    ) -> float:
        """One feature of the event at `idx`; `start` is the first index of its window."""
        ts, cols = s.ts, s.cols
        end = idx + 1  # the window slice [start, end) ends with this transaction
        if agg == "count":
            return float(end - start)
        if agg in ("sum", "mean"):
            col = cols[j]
            p = s.prefix.get(j) if s.prefix is not None else None
            if p is not None:
                total = (p[end] - p[start]) / 100
            elif col.typecode == "i":
                total = sum(col[start:end]) / 100
            else:
                vals = [v for v in col[start:end] if v == v]
                if not vals:
                    return NAN
                return float(sum(vals)) if agg == "sum" else sum(vals) / len(vals)
            return total if agg == "sum" else total / (end - start)
        if agg in NUMERIC_AGGS:
            col = cols[j]
            window = list(col[start:end]) if col.typecode == "d" else [c / 100 for c in col[start:end]]
            return _numeric(agg, [v for v in window if v == v], window[-1])
        if agg == "distinct":
            return float(len({c for c in cols[j][start:end] if c}))
        if agg == "is_new":
            c = cols[j][idx]
            return NAN if not c else float(c not in cols[j][start:idx])
        if agg == "time_since_last":
            return (rel - ts[idx - 1]) / 1000.0 if idx and ts[idx - 1] > rel - self.lookback_ms else NAN
        if agg in ("distance_km", "speed_kmh"):
            return self._geo(s, idx, rel, agg)
        return _label_feature(s, agg, s.base + rel, w, delay)

    def _compile(self) -> tuple[Any, Any]:
        """Straight-line Python for this plan: `fast(s, idx, rel)` computes the features of the
        event at `idx`; `append(s, txn)` is the whole in-order hot path (append, features, evict).

        Counts, sums, means, max/min over cent columns and time since last are inlined; other
        aggregations call `_feature`. A key whose amounts fell back to float64 takes `_compute`,
        and anything but an in-order append of whole cents takes `_observe`.
        """
        steps, codes = self._steps, self.col_codes
        cents = sorted({j for agg, j, _, _ in steps if agg in NUMERIC_AGGS and codes[j] == "i"})
        summed = sorted({j for agg, j, _, _ in steps if agg in ("sum", "mean")})
        body = ["    end = idx + 1", "    pre = s.prefix"]
        body += [f"    st{w} = bisect_right(ts, rel - {w}, 0, idx)" for w in self.windows]
        for j in summed:
            body += [f"    c{j} = cols[{j}]", f"    p{j} = pre.get({j}) if pre is not None else None"]
        for j, w in sorted({(j, w) for agg, j, w, _ in steps if agg in ("sum", "mean")}):
            body.append(
                f"    t{j}_{w} = (p{j}[end] - p{j}[st{w}] if p{j} is not None else sum(c{j}[st{w}:end])) / 100"
            )
        exprs = []
        for k, (agg, j, w, _) in enumerate(steps):
            if agg == "count":
                exprs.append(f"float(end - st{w})")
            elif agg == "sum":
                exprs.append(f"t{j}_{w}")
            elif agg == "mean":
                exprs.append(f"t{j}_{w} / (end - st{w})")
            elif agg in ("max", "min") and j in cents:
                exprs.append(f"{agg}(cols[{j}][st{w}:end]) / 100")
            elif agg == "time_since_last":
                exprs.append(
                    f"((rel - ts[idx - 1]) / 1000.0 if idx and ts[idx - 1] > rel - {self.lookback_ms} else NAN)"
                )
            else:
                start = f"st{w}" if w in self.windows else "0"
                exprs.append(f"feature(s, idx, rel, {start}, *steps[{k}])")
        values = "[" + ", ".join(exprs) + "]"

        fast = ["def fast(s, idx, rel):", "    cols = s.cols", "    ts = s.ts"]
        fast += [f"    if cols[{j}].typecode != 'i': return slow(s, idx, rel)" for j in cents]
        fast += [*body, f"    return {values}"]

        append = ["def append(s, txn):", "    ts = s.ts", "    if not ts: return general(s, txn)"]
        append += ["    rel = txn.ts_ms - s.base", "    if rel < ts[-1]: return general(s, txn)"]
        if self.ts_code == "I":
            append.append(f"    if rel >= {OFFSET_LIMIT}: return general(s, txn)")
        append.append("    cols = s.cols")
        for j, (field, code) in enumerate(zip(self.fields, codes, strict=True)):
            append.append(f"    v{j} = txn.{field}")
            if code == "i":
                append += [
                    f"    if v{j} is None or cols[{j}].typecode != 'i': return general(s, txn)",
                    f"    a{j} = round(v{j} * 100)",
                    f"    if a{j} / 100 != v{j} or not -{CENTS_LIMIT} < a{j} < {CENTS_LIMIT}: return general(s, txn)",
                ]
            elif code == "I":
                append.append(f"    a{j} = 0 if v{j} is None else (crc32(v{j}.encode()) or 1)")
            else:
                append.append(f"    a{j} = NAN if v{j} is None else float(v{j})")
        append.append("    ts.append(rel)")
        append += [f"    cols[{j}].append(a{j})" for j in range(len(codes))]
        append.append("    idx = len(ts) - 1")
        if summed:
            append.append("    if s.prefix is not None:")
            append += [
                f"        q = s.prefix.get({j})\n        if q is not None: q.append(q[-1] + a{j})"
                for j in summed
            ]
            append.append("    elif idx + 1 >= module.PREFIX_MIN: build_prefix(s)")
        append += [*body, f"    out = {values}"]
        append.append(f"    if ts[0] <= rel - {self.retention_ms} or s.labels is not None: evict(s)")
        append.append("    return out, False")

        scope: dict[str, Any] = {
            "bisect_right": bisect_right, "NAN": NAN, "crc32": zlib.crc32, "module": sys.modules[__name__],
            "slow": self._compute, "feature": self._feature, "steps": steps, "general": self._observe,
            "build_prefix": self._build_prefix, "evict": self._evict,
        }  # fmt: skip
        exec("\n".join(fast), scope)
        exec("\n".join(append), scope)
        return scope["fast"], scope["append"]

    def _geo(self, s: EntityState, idx: int, rel: int, agg: str) -> float:
        lats, lons, ts = s.cols[self._lat], s.cols[self._lon], s.ts
        lat, lon = lats[idx], lons[idx]
        if lat != lat:
            return NAN
        oldest = rel - self.lookback_ms
        for i in range(idx - 1, -1, -1):
            if ts[i] <= oldest:
                break
            if lats[i] == lats[i]:
                km = haversine_km(lats[i], lons[i], lat, lon)
                if agg == "distance_km":
                    return km
                return km / max((rel - ts[i]) / 3_600_000, MINUTE_H)
        return NAN


def _numeric(agg: str, vals: list[float], current: float) -> float:
    if not vals:
        return NAN
    if agg == "min":
        return min(vals)
    if agg == "max":
        return max(vals)
    n = len(vals)
    mean = sum(vals) / n
    if agg == "ratio_to_mean":
        return current / mean if mean > 0 else NAN
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n)
    if agg == "std":
        return std
    return (current - mean) / std if std > 0 else NAN  # zscore


def _label_feature(s: EntityState, agg: str, t: int, w: int, delay: int) -> float:
    """Fraud labels known by t on this key's transactions in (t - delay - w, t - delay]."""
    hi, lo = t - delay, t - delay - w
    frauds = 0
    if s.labels is not None:
        txns, known = s.labels
        frauds = sum(1 for i in range(bisect_right(txns, lo), bisect_right(txns, hi)) if known[i] <= t)
    if agg == "label_count":
        return float(frauds)
    n = bisect_right(s.ts, hi - s.base) - bisect_right(s.ts, lo - s.base)
    return frauds / n if n else NAN
