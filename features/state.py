"""Per-key event-time state and the exact look-back aggregations over it.

An `EntityState` is one key's events inside the retention horizon (longest window + label delay +
allowed lateness), sorted by event time, in ONE flat typed buffer (the state object is the array):

    [base, t_0 .. t_{n-1}, c0_0 .. c0_{n-1}, c1_0 .. c1_{n-1}, ...]

`base` is the key's time origin in minutes; event times are millisecond offsets from it, signed
32-bit with a 2**31 bias (a 49.7-day span; plans that look back further use 64-bit 'q' buffers
with no origin). Numeric columns are scaled integers that are exactly the float that arrived
(amounts in cents, coordinates in 1e-7 degrees), categorical columns 32-bit hashes (0 = absent).
A key whose value cannot be stored exactly (a non-cent amount, a NaN...) is widened for good: its
events move to a float64 buffer of the same layout in the `wide` slot. A card with 90 events in 30
days is one object (`benchmarks/features_bench.py` measures it); the snapshot is one bytes object.

`EntityPlan.observe` inserts a transaction at its event-time position and computes each declared
feature over (t - window, t], the transaction itself included, from the events that arrived before
it; events that arrived earlier but lie later in event time are not in its window. Counts come from
a binary search; sums and means of long (hot) keys from block sums kept once a key holds
`PREFIX_MIN` events; other aggregations scan the window. Unwindowed aggregations (time since last,
distance and speed from the previous located event) look back as far as the entity's longest window.
Keys of `LAZY_MIN` events or more drop expired events in batches (see `features.codegen`).

The window reads of an integer buffer (counts, sums, means, max, min, distinct, time since last)
run in `features._kernel` (C, built at install) when it is there, and in generated Python when it
is not: same integers, same divisions, the same floats (tests run every case both ways).
"""

from __future__ import annotations

import math
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from operator import attrgetter
from typing import Any

from features.events import Transaction
from features.spec import CATEGORICAL_AGGS, LABEL_AGGS, NUMERIC_AGGS, Entity, WindowFeature

try:  # the compiled window reads (features/_kernel.c); the same plans run in Python without it
    from features._kernel import window_features as KERNEL
except ImportError:  # pragma: no cover - an install without a C compiler
    KERNEL = None


def kernel_name() -> str:
    """Which window reads new plans use: "compiled" (features/_kernel.c) or "python"."""
    return "python" if KERNEL is None else "compiled"


NAN = float("nan")
MINUTE_H = 1 / 60
MINUTE_MS = 60_000
OFFSET_LIMIT = 2**32  # a 32-bit buffer spans 2**32 ms (49.7 days) of event time
BIAS = 2**31  # offsets are stored signed: t - base - BIAS
INT_LIMIT = 2**31
MISSING = -(2**31)  # an absent coordinate in an integer column (never a valid scaled value)
SNAPSHOT_FORMAT = "state/2"  # bumped whenever the snapshot layout changes
PREFIX_MIN = 128  # keys this long keep block sums (`Prefix`): window sums of hot merchants in O(block)
PREFIX_BLOCK = 32  # events per block: 8 bytes per 32 events
SMALL_BLOCK = 512  # CPython's small-object allocator serves up to this many bytes
PRESIZE_AT = 8  # a key reaching this many events gets a buffer past SMALL_BLOCK at once (`presize`)
LAZY_MIN = 1024  # keys this long evict expired events in batches (see `features.codegen`), not one by one
LAZY_SHIFT = 5  # ... once more than n >> LAZY_SHIFT (n/32) of their n events have expired
SCALES = {"lat": 10**7, "lon": 10**7}  # integer units per 1.0; other numeric fields: cents
GEO_FIELDS = ("lat", "lon")
KERNEL_OPS = {"count": 0, "sum": 1, "mean": 2, "max": 3, "min": 4, "distinct": 5, "time_since_last": 6}
KERNEL_PYTHON = 7  # an aggregation the kernel leaves to Python (it returns the window's first index)


def stable_hash(value: str) -> int:
    """A non-zero 32-bit hash that is the same in every process (Python's `hash` is salted)."""
    return zlib.crc32(value.encode()) or 1


def _signed(h: int) -> int:
    """A 32-bit unsigned hash as the signed value stored in the buffer (0 stays 0 = absent)."""
    return (h ^ 0x80000000) - 0x80000000


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(a)))


def _scaled(v: float, scale: int) -> int | None:
    """`v` as an integer number of 1/scale units when that is exact and fits 32 bits, else None."""
    if v != v or v in (math.inf, -math.inf):
        return None
    c = round(v * scale)
    return c if c / scale == v and -INT_LIMIT < c < INT_LIMIT else None


class Prefix:
    """Block sums of a long key's summed columns, for window sums that read O(block) values.

    `sums[j][b] - sums[j][a]` is the sum of column j over the events at positions
    [a * block - shift, b * block - shift): the first `shift` events of block 0 have been evicted
    (only differences are read, so dropping whole blocks from the front needs no other update).
    """

    __slots__ = ("shift", "sums")

    def __init__(self, sums: dict[int, array[int]]) -> None:
        self.shift = 0
        self.sums = sums


def presize(s: array[Any]) -> None:
    """Move a growing key's buffer out of CPython's small-object allocator now, in one step.

    A buffer of up to 512 bytes lives in pymalloc's pools; growing one event at a time it takes a
    block of each size class in turn, and once past 512 bytes it leaves them all behind. Pools
    that also hold a long-lived object (another key's header or key string) are never given back.
    Here, at `PRESIZE_AT` events, the buffer is grown past 512 bytes (moving it to malloc) and the
    padding is deleted 15 items at a time, which CPython's array does without shrinking the
    allocation: the key then grows in place for a while. Only allocation changes. At 8 events
    rather than 16, 100,000 cards growing together leave 11 MiB of pymalloc free space instead of
    30, for 2% more state (docs/features.md, "Speed and memory").
    """
    pad = SMALL_BLOCK // s.itemsize + 1 - len(s)
    if pad <= 0:
        return
    s.extend([0] * pad)
    while pad > 0:
        step = min(15, pad)
        del s[len(s) - step :]
        pad -= step


def window_sum(s: array[int], pre: Prefix, j: int, o: int, start: int, end: int, block: int) -> int:
    """sum(s[o + start : o + end]), column j's values at positions [start, end), from block sums."""
    e = pre.shift
    b1, b2 = (start + e + block - 1) // block, (end + e) // block
    if b2 <= b1:
        return sum(s[o + start : o + end])
    p = pre.sums[j]
    return p[b2] - p[b1] + sum(s[o + start : o + b1 * block - e]) + sum(s[o + b2 * block - e : o + end])


class EntityState(array):
    """Events of one key in one flat buffer (see the module docstring for the layout).

    Slots: `wide` is None, or the float64 buffer that holds the events once the key was widened
    (this buffer is then empty); `labels` is None until the key's first fraud label: (transaction
    times, label times); `prefix` (derived, never snapshotted) is None or the block sums of the
    summed columns of a long key.
    """

    __slots__ = ("labels", "prefix", "wide")

    wide: array[float] | None
    labels: tuple[array[int], array[int]] | None
    prefix: Prefix | None

    def __new__(cls, typecode: str) -> EntityState:
        self = super().__new__(cls, typecode)
        self.wide = self.labels = self.prefix = None
        return self

    def data(self) -> array[Any]:
        """The buffer that holds the events: this one, or the float64 one once widened."""
        return self if self.wide is None else self.wide

    def snapshot(self) -> tuple[Any, ...]:
        """An immutable copy (Bytewax may pickle it after the state has changed again)."""
        d = self.data()
        labels = None if self.labels is None else (self.labels[0].tobytes(), self.labels[1].tobytes())
        return (SNAPSHOT_FORMAT, self.typecode, d.typecode, d.tobytes(), labels)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:  # array's own would drop the slots
        return (restore_state, (self.snapshot(),))


def restore_state(snap: tuple[Any, ...]) -> EntityState:
    """The state `EntityState.snapshot` describes (block sums are rebuilt on the next event)."""
    if not (isinstance(snap, tuple) and len(snap) == 5 and snap[0] == SNAPSHOT_FORMAT):
        raise ValueError(
            "feature state snapshot in an unknown format (written by another version of the engine?): "
            "finish that run with its own version, or clear the recovery directory (fraud reset)"
        )
    _, code, data_code, raw, labels = snap
    s = EntityState(code)
    if data_code == code:
        s.frombytes(raw)
    else:
        s.wide = array(data_code)
        s.wide.frombytes(raw)
    if labels is not None:
        txns, known = array("q"), array("q")
        txns.frombytes(labels[0])
        known.frombytes(labels[1])
        s.labels = (txns, known)
    return s


class EntityPlan:
    """How one entity's declared features are stored and computed."""

    def __init__(self, entity: Entity, features: tuple[WindowFeature, ...], allowed_lateness_ms: int) -> None:
        self.entity = entity
        self.features = features
        self.names = [f.name for f in features]
        geo = any(f.agg in ("distance_km", "speed_kmh") for f in features)
        num = sorted(
            {f.field for f in features if f.agg in NUMERIC_AGGS and f.field}
            | (set(GEO_FIELDS) if geo else set())
        )
        cat = sorted({f.field for f in features if f.agg in CATEGORICAL_AGGS and f.field})
        self.num_fields, self.cat_fields = num, cat
        self.fields = [*num, *cat]
        self.width = 1 + len(self.fields)  # segments: event times, then one per column
        self.scales = [SCALES.get(f, 100) for f in num]
        # A column only the geo features read may hold MISSING; one a numeric aggregation reads may
        # not (an absent value there widens the key to floats, where it is a NaN).
        aggregated = {f.field for f in features if f.agg in NUMERIC_AGGS}
        self.nullable = [f in GEO_FIELDS and f not in aggregated for f in num]
        self.ints = {j for j in range(len(num)) if not self.nullable[j]}  # never MISSING
        self.summed = sorted({num.index(f.field) for f in features if f.agg in ("sum", "mean") and f.field})
        # Read when the plan is built (tests shrink them to reach the long-key paths with few events).
        self.block, self.prefix_min = PREFIX_BLOCK, max(PREFIX_MIN, PREFIX_BLOCK)
        self.lazy_min, self.lazy_shift = LAZY_MIN, LAZY_SHIFT
        self.uses_labels = any(f.agg in LABEL_AGGS for f in features)
        self.lookback_ms = max(f.window_ms + f.delay_ms for f in features)
        self.retention_ms = self.lookback_ms + allowed_lateness_ms
        self.allowed_lateness_ms = allowed_lateness_ms
        # 32-bit offsets from a per-key origin when the retention fits comfortably in their span.
        self.code = "i" if self.retention_ms < OFFSET_LIMIT * 3 // 4 else "q"
        self.bias = BIAS if self.code == "i" else 0
        self.windows = sorted({f.window_ms for f in features if f.window_ms and not f.delay_ms})
        self._steps = [(f.agg, self._column(f), f.window_ms, f.delay_ms) for f in features]
        self.kernel = KERNEL  # read when the plan is built (tests build plans with and without it)
        self._fast, self.observe = codegen.compile_plan(self)  # type: ignore[method-assign]
        self._get: Callable[[Transaction], Any] = attrgetter(*entity.fields)
        self._single = len(entity.fields) == 1
        self._prefix = entity.name + ":"
        self._lat = num.index("lat") if geo else -1
        self._lon = num.index("lon") if geo else -1

    def _column(self, f: WindowFeature) -> int:
        """Index of the feature's source column (0 = first after the event times), or -1."""
        if f.field is None:
            return -1
        return (
            self.num_fields.index(f.field)
            if f.agg in NUMERIC_AGGS
            else len(self.num_fields) + self.cat_fields.index(f.field)
        )

    def new_state(self) -> EntityState:
        return EntityState(self.code)

    def restore(self, snapshot: tuple[Any, ...]) -> EntityState:
        """The state of `snapshot`, refused clearly if another feature set's layout wrote it."""
        s = restore_state(snapshot)
        d = s.data()
        if s.typecode != self.code or (len(d) and (len(d) - 1) % self.width):
            raise ValueError(
                f"feature state snapshot of {self.entity.name!r} has another layout than this feature set "
                f"({s.typecode!r} buffer of {len(d)} items; this set stores {self.code!r} events of "
                f"{self.width} items): it was written for another feature set; finish that run with it, "
                "or clear the recovery directory (fraud reset)"
            )
        return s

    def key_of(self, txn: Transaction) -> str | None:
        """The state key of `txn` for this entity, or None when a key field is missing."""
        if self._single:
            v = self._get(txn)
            return self._prefix + v if v else None
        parts = self._get(txn)
        if not all(parts):
            return None
        return self._prefix + "|".join(parts)

    # -- layout -----------------------------------------------------------------------------

    def count(self, state: EntityState) -> int:
        """Number of events the key holds."""
        return self._count(state.data())

    def _count(self, d: array[Any]) -> int:
        """Events in buffer `d` (empty: a new key, or the emptied buffer of a widened one)."""
        return (len(d) - 1) // self.width if len(d) else 0

    def _base(self, d: array[Any]) -> int:
        return int(d[0]) * MINUTE_MS + self.bias

    def event_times(self, state: EntityState) -> list[int]:
        """The held events' times (epoch ms), oldest first."""
        d, n = state.data(), self.count(state)
        base = self._base(d) if n else 0
        return [base + int(x) for x in d[1 : 1 + n]]

    def column(self, state: EntityState, field: str) -> list[Any]:
        """The held events' values of `field`, decoded (numbers as floats, categories as hashes)."""
        d, n = state.data(), self.count(state)
        j = self.fields.index(field)
        if j < len(self.num_fields):
            return self._numbers(d, n, j, 0, n)
        o = 1 + (j + 1) * n
        return [int(c) for c in d[o : o + n]]

    def max_ts(self, state: EntityState) -> int:
        d = state.data()
        n = self._count(d)
        return self._base(d) + int(d[n]) if n else -(2**62)

    def expired(self, state: EntityState, now_ms: int) -> bool:
        """True once the key's newest event has left every window (the key can be dropped)."""
        newest = self.max_ts(state)
        if state.labels is not None and state.labels[0]:
            newest = max(newest, state.labels[0][-1])
        return newest <= now_ms - self.retention_ms

    # -- updates ---------------------------------------------------------------------------

    def observe(self, state: EntityState, txn: Transaction) -> tuple[list[float], bool]:
        """Add `txn` to `state`; return its feature values and whether it arrived too late to be exact.

        Replaced per instance by the compiled in-order append (see `features.codegen`), which falls back
        here for anything else: first event, out of order, re-basing, a value to widen.
        """
        return self._observe(state, txn)

    def _observe(self, s: EntityState, txn: Transaction) -> tuple[list[float], bool]:
        """The general insertion: any event time, any value."""
        t = txn.ts_ms
        d = s.data()
        n = self._count(d)
        late = False
        if not len(d):
            d.append((t - self.allowed_lateness_ms) // MINUTE_MS if self.code == "i" else 0)
        elif n:
            newest = self._base(d) + int(d[n])
            late = t < newest - self.allowed_lateness_ms
            if t <= newest - self.retention_ms:  # older than everything kept: it can only see itself
                return self._observe(self.new_state(), txn)[0], True
            if late:
                # The in-order path leaves a long key's expired events in place until n/32 of them
                # have expired. No event within the allowed lateness can reach them, but a late
                # one could: drop them first, so that what it sees never depends on that schedule.
                self._evict(s, d, n)
                n = self._count(d)
        if d is s and self.code == "i":
            rel = t - self._base(s)
            if rel >= INT_LIMIT:  # past the span: what falls below the new origin is evicted below
                self._rebase(s, n, (t - self.retention_ms) // MINUTE_MS)
            elif rel < -INT_LIMIT:
                self._rebase(s, n, t // MINUTE_MS)
        row: Sequence[float] | None = self._encode(txn) if d is s else None
        if row is None:
            if d is s:
                d = self._widen(s, n)
            row = self._encode_wide(txn)
        rel = t - self._base(d)
        with memoryview(d) as view:
            idx = bisect_right(view, rel, 1, 1 + n) - 1
        for seg in range(self.width - 1, 0, -1):
            d.insert(1 + seg * n + idx, row[seg - 1])
        d.insert(1 + idx, rel)
        n += 1
        if d is s and self.summed:
            if s.prefix is not None:
                self._update_prefix(s, n, idx)
            elif n >= self.prefix_min:
                self._build_prefix(s, n)
        values = self._fast(s, n, idx, rel) if d is s else self._compute(d, n, s, idx, rel)
        self._evict(s, d, n)
        return values, late

    def _encode(self, txn: Transaction) -> list[int] | None:
        """The integer columns of `txn`, or None when a value cannot be stored exactly."""
        row: list[int] = []
        for j, f in enumerate(self.num_fields):
            v = getattr(txn, f)
            if v is None and self.nullable[j]:
                row.append(MISSING)
                continue
            c = None if v is None else _scaled(float(v), self.scales[j])
            if c is None:
                return None
            row.append(c)
        for f in self.cat_fields:
            v = getattr(txn, f)
            row.append(0 if v is None else _signed(stable_hash(v)))
        return row

    def _encode_wide(self, txn: Transaction) -> list[float]:
        row = [NAN if (v := getattr(txn, f)) is None else float(v) for f in self.num_fields]
        for f in self.cat_fields:
            v = getattr(txn, f)
            row.append(0.0 if v is None else float(_signed(stable_hash(v))))
        return row

    def _widen(self, s: EntityState, n: int) -> array[float]:
        """Move the key's events to a float64 buffer of the same layout, for good."""
        w = array("d", [float(s[0])] if len(s) else [0.0])
        w.extend(float(x) for x in s[1 : 1 + n])
        for j in range(len(self.num_fields)):
            w.extend(self._numbers(s, n, j, 0, n))
        o = 1 + (1 + len(self.num_fields)) * n
        w.extend(float(x) for x in s[o : o + len(self.cat_fields) * n])
        del s[:]
        s.wide, s.prefix = w, None
        return w

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

    def _build_prefix(self, s: EntityState, n: int) -> None:
        b = self.block
        s.prefix = Prefix(
            {
                j: array(
                    "q", accumulate((sum(s[o + i : o + i + b]) for i in range(0, n - b + 1, b)), initial=0)
                )
                for j in self.summed
                for o in (1 + (j + 1) * n,)
            }
        )

    def _update_prefix(self, s: EntityState, n: int, idx: int) -> None:
        """After an insertion at `idx` (n events now): recompute the blocks from the one holding it."""
        pre, b = s.prefix, self.block
        assert pre is not None
        e = pre.shift
        for j, p in pre.sums.items():
            o = 1 + (j + 1) * n
            del p[(idx + e) // b + 1 :]
            for k in range(len(p), (n + e) // b + 1):  # block 0 holds only b - e events
                p.append(p[-1] + sum(s[o + max(0, (k - 1) * b - e) : o + k * b - e]))

    def _shrink_prefix(self, s: EntityState, n: int, k: int) -> None:
        """After `k` events were evicted from the front (n left): drop the blocks they emptied."""
        pre, b = s.prefix, self.block
        assert pre is not None
        if n < b:
            s.prefix = None
            return
        pre.shift += k
        whole = pre.shift // b
        if whole:
            pre.shift -= whole * b
            for p in pre.sums.values():
                del p[:whole]

    def _rebase(self, s: EntityState, n: int, new_base: int) -> None:
        """Move the key's origin to minute `new_base`; offsets that fall below it are clamped (and
        evicted right after the insertion, being older than the retention)."""
        shift = (int(s[0]) - new_base) * MINUTE_MS
        lo, hi = -INT_LIMIT, INT_LIMIT - 1
        s[1 : 1 + n] = array(s.typecode, (min(hi, max(lo, x + shift)) for x in s[1 : 1 + n]))
        s[0] = new_base

    def _evict(self, s: EntityState, d: array[Any], n: int) -> None:
        horizon = d[n] - self.retention_ms
        with memoryview(d) as view:
            k = bisect_right(view, horizon, 1, 1 + n) - 1
        if k:
            for seg in range(self.width - 1, -1, -1):
                del d[1 + seg * n : 1 + seg * n + k]
            if s.prefix is not None:
                self._shrink_prefix(s, n - k, k)
        if s.labels is not None:
            self._evict_labels(s, self._base(d) + horizon)

    @staticmethod
    def _evict_labels(s: EntityState, horizon: int) -> None:
        """Drop the labels of transactions at or before `horizon` (epoch ms)."""
        assert s.labels is not None
        m = bisect_right(s.labels[0], horizon)
        if m:
            del s.labels[0][:m]
            del s.labels[1][:m]

    # -- features ---------------------------------------------------------------------------

    def _numbers(self, d: array[Any], n: int, j: int, start: int, end: int) -> list[float]:
        """Numeric column `j`, events [start, end), as floats (NaN where absent)."""
        o = 1 + (j + 1) * n
        if d.typecode == "d":
            return list(d[o + start : o + end])
        scale = self.scales[j]
        return [NAN if c == MISSING else c / scale for c in d[o + start : o + end]]

    def _compute(self, d: array[Any], n: int, s: EntityState, idx: int, rel: int) -> list[float]:
        """The reference implementation, feature by feature (the compiled one is `_fast`)."""
        with memoryview(d) as view:
            starts = {w: bisect_right(view, rel - w, 1, 1 + idx) - 1 for w in self.windows}
        return [
            self._feature(d, n, s, idx, rel, starts.get(w, 0), agg, j, w, delay)
            for agg, j, w, delay in self._steps
        ]

    def _feature(
        self, d: array[Any], n: int, s: EntityState, idx: int, rel: int, start: int, agg: str, j: int, w: int,
        delay: int,
    ) -> float:  # fmt: skip
        """One feature of the event at `idx` of buffer `d` (`n` events); `start` is the first index
        of its window."""
        end = idx + 1  # the window [start, end) ends with this transaction
        o = 1 + (j + 1) * n
        if agg == "count":
            return float(end - start)
        if agg in ("sum", "mean"):
            if d.typecode != "d":
                pre = s.prefix
                raw = (
                    sum(d[o + start : o + end])
                    if pre is None
                    else window_sum(d, pre, j, o, start, end, self.block)
                )
                total = raw / self.scales[j]
                return total if agg == "sum" else total / (end - start)
            vals = [v for v in d[o + start : o + end] if v == v]
            if not vals:
                return NAN
            return float(sum(vals)) if agg == "sum" else sum(vals) / len(vals)
        if agg in NUMERIC_AGGS:
            window = self._numbers(d, n, j, start, end)
            return _numeric(agg, [v for v in window if v == v], window[-1])
        if agg == "distinct":
            return float(len({c for c in d[o + start : o + end] if c}))
        if agg == "is_new":
            c = d[o + idx]
            return NAN if not c else float(c not in d[o + start : o + idx])
        if agg == "time_since_last":  # the previous event is at position idx (times start at 1)
            return (rel - d[idx]) / 1000.0 if idx and d[idx] > rel - self.lookback_ms else NAN
        if agg in ("distance_km", "speed_kmh"):
            return self._geo(d, n, idx, rel, agg)
        return self._label_feature(d, n, s, agg, self._base(d) + rel, w, delay)

    def _geo(self, d: array[Any], n: int, idx: int, rel: int, agg: str) -> float:
        """Distance (or speed) from the newest earlier located event within the lookback."""
        o_lat, o_lon = 1 + (self._lat + 1) * n, 1 + (self._lon + 1) * n
        if d.typecode == "d":
            lat, lon = d[o_lat + idx], d[o_lon + idx]
            if lat != lat:
                return NAN
        else:
            c = d[o_lat + idx]
            if c == MISSING:
                return NAN
            lat, lon = c / self.scales[self._lat], d[o_lon + idx] / self.scales[self._lon]
        oldest = rel - self.lookback_ms
        for i in range(idx - 1, -1, -1):
            ti = d[1 + i]
            if ti <= oldest:
                break
            c = d[o_lat + i]
            if d.typecode == "d":
                if c != c:
                    continue
                km = haversine_km(c, d[o_lon + i], lat, lon)
            elif c == MISSING:
                continue
            else:
                km = haversine_km(c / self.scales[self._lat], d[o_lon + i] / self.scales[self._lon], lat, lon)
            if agg == "distance_km":
                return km
            return km / max((rel - ti) / 3_600_000, MINUTE_H)
        return NAN

    def _label_feature(
        self, d: array[Any], n: int, s: EntityState, agg: str, t: int, w: int, delay: int
    ) -> float:
        """Fraud labels known by t on this key's transactions in (t - delay - w, t - delay], or (for
        `delayed_count`) the transactions of that window."""
        hi, lo = t - delay, t - delay - w
        frauds = 0
        if s.labels is not None and agg != "delayed_count":
            txns, known = s.labels
            frauds = sum(1 for i in range(bisect_right(txns, lo), bisect_right(txns, hi)) if known[i] <= t)
        if agg == "label_count":
            return float(frauds)
        base = self._base(d)
        with memoryview(d) as view:
            count = bisect_right(view, hi - base, 1, 1 + n) - bisect_right(view, lo - base, 1, 1 + n)
        if agg == "delayed_count":
            return float(count)
        return frauds / count if count else NAN

    def kernel_program(self) -> bytes:
        """This plan for `features._kernel.window_features` (the format is in its source)."""
        return codegen.kernel_program(self)


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


from features import codegen  # noqa: E402  (it reads this module's names: import it last)
