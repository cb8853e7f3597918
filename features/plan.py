"""How one entity's declared features are stored and computed: `EntityPlan`.

`EntityPlan.observe` inserts a transaction at its event-time position and computes each declared
feature over (t - window, t], the transaction itself included, from the events that arrived before
it; events that arrived earlier but lie later in event time are not in its window. Counts come from
a binary search; sums and means of long (hot) keys from block sums kept once a key holds
`PREFIX_MIN` events; other aggregations scan the window. Unwindowed aggregations (time since last,
distance and speed from the previous located event) look back as far as the entity's longest window.
Keys of `LAZY_MIN` events or more drop expired events in batches (see `features.codegen`).

The buffer layout is `features.buffer`; what each aggregation computes, `features.aggregations`.
The window reads of an integer buffer run in `features._kernel` (C, built at install) when it is
there, and in generated Python (`features.codegen`) when it is not: same integers, same divisions,
the same floats (tests run every case both ways).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

from features import aggregations, buffer, codegen
from features.aggregations import AGGREGATIONS
from features.buffer import (
    BIAS,
    GEO_FIELDS,
    INT_LIMIT,
    MINUTE_MS,
    MISSING,
    NAN,
    OFFSET_LIMIT,
    SCALES,
    EntityState,
    events_in,
    numbers,
    origin,
    restore_state,
    scaled,
    signed,
    stable_hash,
)
from features.events import Transaction
from features.spec import Entity, WindowFeature


class EntityPlan:
    """How one entity's declared features are stored and computed.

    `position` is the entity's place in its pipeline: the index of its key in a row's `keys`.
    """

    def __init__(
        self, entity: Entity, features: tuple[WindowFeature, ...], allowed_lateness_ms: int, position: int = 0
    ) -> None:
        self.entity = entity
        self.features = features
        self.position = position
        self.names = [f.name for f in features]
        kinds = [AGGREGATIONS[f.agg] for f in features]
        geo = any(a.geo for a in kinds)
        numeric = {f.field for f, a in zip(features, kinds, strict=True) if a.field == "numeric" and f.field}
        num = sorted(numeric | (set(GEO_FIELDS) if geo else set()))
        cat = sorted(
            {f.field for f, a in zip(features, kinds, strict=True) if a.field == "categorical" and f.field}
        )
        self.num_fields, self.cat_fields = num, cat
        self.fields = [*num, *cat]
        self.width = 1 + len(self.fields)  # segments: event times, then one per column
        self.scales = [SCALES.get(f, 100) for f in num]
        # A column only the geo features read may hold MISSING; one a numeric aggregation reads may
        # not (an absent value there widens the key to floats, where it is a NaN).
        self.nullable = [f in GEO_FIELDS and f not in numeric for f in num]
        self.ints = {j for j in range(len(num)) if not self.nullable[j]}  # never MISSING
        self.summed = sorted(
            {
                num.index(f.field)
                for f, a in zip(features, kinds, strict=True)
                if a.shared == "sum" and f.field
            }
        )
        # Read when the plan is built (tests shrink them to reach the long-key paths with few events).
        self.block, self.prefix_min = buffer.PREFIX_BLOCK, max(buffer.PREFIX_MIN, buffer.PREFIX_BLOCK)
        self.lazy_min, self.lazy_shift = buffer.LAZY_MIN, buffer.LAZY_SHIFT
        self.uses_labels = any(a.labels for a in kinds)
        self.lookback_ms = max(f.window_ms + f.delay_ms for f in features)
        self.retention_ms = self.lookback_ms + allowed_lateness_ms
        self.allowed_lateness_ms = allowed_lateness_ms
        # 32-bit offsets from a per-key origin when the retention fits comfortably in their span.
        self.code = "i" if self.retention_ms < OFFSET_LIMIT * 3 // 4 else "q"
        self.bias = BIAS if self.code == "i" else 0
        self.windows = sorted({f.window_ms for f in features if f.window_ms and not f.delay_ms})
        self.steps = [(f.agg, self._column(f), f.window_ms, f.delay_ms) for f in features]
        self.references = [a.reference for a in kinds]
        self.lat_column = num.index("lat") if geo else -1
        self.lon_column = num.index("lon") if geo else -1
        self.kernel = (
            aggregations.KERNEL
        )  # read when the plan is built (tests build plans with and without it)
        # The generated code: the features of an integer buffer's event, and the in-order append.
        self.compute_fast, self.observe_fn = codegen.compile_plan(self)
        self._get: Callable[[Transaction], Any] = attrgetter(*entity.fields)
        self._single = len(entity.fields) == 1
        self._prefix = entity.name + ":"

    def _column(self, f: WindowFeature) -> int:
        """Index of the feature's source column (0 = first after the event times), or -1."""
        if f.field is None:
            return -1
        return (
            self.num_fields.index(f.field)
            if AGGREGATIONS[f.agg].field == "numeric"
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
        return events_in(state.data(), self.width)

    def event_times(self, state: EntityState) -> list[int]:
        """The held events' times (epoch ms), oldest first."""
        d, n = state.data(), self.count(state)
        base = origin(d, self.bias) if n else 0
        return [base + int(x) for x in d[1 : 1 + n]]

    def column(self, state: EntityState, field: str) -> list[Any]:
        """The held events' values of `field`, decoded (numbers as floats, categories as hashes)."""
        d, n = state.data(), self.count(state)
        j = self.fields.index(field)
        if j < len(self.num_fields):
            return numbers(d, n, j, 0, n, self.scales[j])
        o = 1 + (j + 1) * n
        return [int(c) for c in d[o : o + n]]

    def max_ts(self, state: EntityState) -> int:
        d = state.data()
        n = events_in(d, self.width)
        return origin(d, self.bias) + int(d[n]) if n else -(2**62)

    def expired(self, state: EntityState, now_ms: int) -> bool:
        """True once the key's newest event has left every window (the key can be dropped)."""
        newest = self.max_ts(state)
        if state.labels is not None and state.labels[0]:
            newest = max(newest, state.labels[0][-1])
        return newest <= now_ms - self.retention_ms

    # -- updates ---------------------------------------------------------------------------

    def observe(self, state: EntityState, txn: Transaction) -> tuple[list[float], bool]:
        """Add `txn` to `state`; return its feature values and whether it arrived too late to be exact.

        It runs `observe_fn` (hot loops call that directly): the in-order append generated for this
        plan (`features.codegen`), which hands anything else to `observe_general`.
        """
        return self.observe_fn(state, txn)

    def observe_general(self, s: EntityState, txn: Transaction) -> tuple[list[float], bool]:
        """The general insertion: any event time, any value (first event, out of order, re-basing,
        a value to widen, a widened key)."""
        t = txn.ts_ms
        d = s.data()
        n = events_in(d, self.width)
        late = False
        if not len(d):
            d.append((t - self.allowed_lateness_ms) // MINUTE_MS if self.code == "i" else 0)
        elif n:
            newest = origin(d, self.bias) + int(d[n])
            late = t < newest - self.allowed_lateness_ms
            if t <= newest - self.retention_ms:  # older than everything kept: it can only see itself
                return self.observe_general(self.new_state(), txn)[0], True
            if late:
                # The in-order path leaves a long key's expired events in place until n/32 of them
                # have expired. No event within the allowed lateness can reach them, but a late
                # one could: drop them first, so that what it sees never depends on that schedule.
                self._evict(s, d, n)
                n = events_in(d, self.width)
        if d is s and self.code == "i":
            rel = t - origin(s, self.bias)
            if rel >= INT_LIMIT:  # past the span: what falls below the new origin is evicted below
                self._rebase(s, n, (t - self.retention_ms) // MINUTE_MS)
            elif rel < -INT_LIMIT:
                self._rebase(s, n, t // MINUTE_MS)
        row: Sequence[float] | None = self._encode(txn) if d is s else None
        if row is None:
            if d is s:
                d = self._widen(s, n)
            row = self._encode_wide(txn)
        rel = t - origin(d, self.bias)
        with memoryview(d) as view:
            idx = bisect_right(view, rel, 1, 1 + n) - 1
        for seg in range(self.width - 1, 0, -1):
            d.insert(1 + seg * n + idx, row[seg - 1])
        d.insert(1 + idx, rel)
        n += 1
        if d is s and self.summed:
            if s.prefix is not None:
                buffer.update_prefix(s, n, idx, self.block)
            elif n >= self.prefix_min:
                self.build_prefix(s, n)
        values = self.compute_fast(s, n, idx, rel) if d is s else self.compute_reference(d, n, s, idx, rel)
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
            c = None if v is None else scaled(float(v), self.scales[j])
            if c is None:
                return None
            row.append(c)
        for f in self.cat_fields:
            v = getattr(txn, f)
            row.append(0 if v is None else signed(stable_hash(v)))
        return row

    def _encode_wide(self, txn: Transaction) -> list[float]:
        row = [NAN if (v := getattr(txn, f)) is None else float(v) for f in self.num_fields]
        for f in self.cat_fields:
            v = getattr(txn, f)
            row.append(0.0 if v is None else float(signed(stable_hash(v))))
        return row

    def _widen(self, s: EntityState, n: int) -> array[float]:
        """Move the key's events to a float64 buffer of the same layout, for good."""
        w = array("d", [float(s[0])] if len(s) else [0.0])
        w.extend(float(x) for x in s[1 : 1 + n])
        for j in range(len(self.num_fields)):
            w.extend(numbers(s, n, j, 0, n, self.scales[j]))
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

    def build_prefix(self, s: EntityState, n: int) -> None:
        """Give the key (`n` events) the block sums of this plan's summed columns."""
        buffer.build_prefix(s, n, self.summed, self.block)

    def _rebase(self, s: EntityState, n: int, new_base: int) -> None:
        """Move the key's origin to minute `new_base`; offsets that fall below it are clamped (and
        evicted right after the insertion, being older than the retention)."""
        shift = (int(s[0]) - new_base) * MINUTE_MS
        lo, hi = -INT_LIMIT, INT_LIMIT - 1
        # The offsets are sorted: those clamped are a run at either end, found by bisection.
        with memoryview(s) as view:
            a, b = bisect_left(view, lo - shift, 1, 1 + n), bisect_right(view, hi - shift, 1, 1 + n)
        s[1 : 1 + n] = array(s.typecode, [lo] * (a - 1) + [x + shift for x in s[a:b]] + [hi] * (1 + n - b))
        s[0] = new_base

    def _evict(self, s: EntityState, d: array[Any], n: int) -> None:
        horizon = d[n] - self.retention_ms
        with memoryview(d) as view:
            k = bisect_right(view, horizon, 1, 1 + n) - 1
        if k:
            for seg in range(self.width - 1, -1, -1):
                del d[1 + seg * n : 1 + seg * n + k]
            if s.prefix is not None:
                buffer.shrink_prefix(s, n - k, k, self.block)
        if s.labels is not None:
            buffer.evict_labels(s, origin(d, self.bias) + horizon)

    # -- features ---------------------------------------------------------------------------

    def compute_reference(self, d: array[Any], n: int, s: EntityState, idx: int, rel: int) -> list[float]:
        """The features of the event at `idx` of buffer `d` (`n` events), each by its aggregation's
        reference function: any buffer, widened ones included (`compute_fast`: integer ones)."""
        with memoryview(d) as view:
            starts = {w: bisect_right(view, rel - w, 1, 1 + idx) - 1 for w in self.windows}
        return [
            ref(self, d, n, s, idx, rel, starts.get(w, 0), j, w, delay)
            for ref, (_, j, w, delay) in zip(self.references, self.steps, strict=True)
        ]

    def kernel_program(self) -> bytes:
        """This plan for `features._kernel.window_features` (the format is in its source)."""
        return codegen.kernel_program(self)
