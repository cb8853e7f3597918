"""The aggregations: ONE table, one entry per aggregation a `WindowFeature` may declare.

Each entry (`Aggregation`) holds everything about its aggregation:

- what it takes (a numeric field, a categorical one, or none), whether it has a window, whether a
  label delay may shift it, whether it reads the key's fraud labels or its location: the spec's
  validation (`features.spec`) and the plan's columns (`features.plan`) follow from these;
- `reference`: the Python definition, over any buffer (integer or widened float64), from the
  window's first index. It computes the feature wherever no faster path does;
- `template`: the expression the generated hot path (`features.codegen`) inlines for integer
  buffers, or None to call `reference` there too;
- `kernel_op`: its op code in `features/_kernel.c` (the `OP_*` enum), or None: Python only.

The compiled kernel, the template and the reference give the same floats (same integers, same
divisions in the same order): `tests/test_features.py` compares them bit for bit, and against a
brute-force recomputation over the raw events.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from features.buffer import MISSING, NAN, EntityState, numbers, origin, window_sum

if TYPE_CHECKING:
    Buffer = array[Any]  # a key's event buffer: an integer `EntityState`, or the float64 one it widened to

try:  # the compiled window reads (features/_kernel.c); the same plans run in Python without it
    from features._kernel import Appender as APPENDER
    from features._kernel import window_features as KERNEL
except ImportError:  # pragma: no cover - an install without a C compiler
    APPENDER = KERNEL = None
# Plans read KERNEL when they are built (tests build plans with and without it).

KERNEL_PYTHON = 7  # the kernel's OP_PYTHON: left to Python (the kernel returns its window's start)
MINUTE_H = 1 / 60  # the shortest time a speed is measured over, in hours


def kernel_name() -> str:
    """Which window reads new plans use: "compiled" (features/_kernel.c) or "python"."""
    return "python" if KERNEL is None else "compiled"


class Context(Protocol):
    """What a reference function reads of its plan (`features.plan.EntityPlan` is one)."""

    scales: list[int]  # per numeric column: integer units per 1.0
    block: int  # events per block sum
    bias: int  # added to the origin of a time offset
    lookback_ms: int  # how far unwindowed aggregations look back
    lat_column: int  # numeric column of the latitude (-1: none)
    lon_column: int


Reference = Callable[[Context, "Buffer", int, EntityState, int, int, int, int, int, int], float]
"""`(plan, d, n, s, idx, rel, start, j, w, delay)`: the feature of the event at position `idx` of
buffer `d` (`n` events; `s` the key's state, `d` itself or the buffer it widened to), whose time
offset is `rel`; its window is [start, idx]. `j` is the source column (0 = the first after the
event times; -1: none), `w` the window and `delay` the label delay in ms."""


@dataclass(frozen=True)
class Aggregation:
    """One aggregation: its rules, its reference definition and its fast paths.

    `template` is a Python expression over the generated function's locals: `s` (the integer
    buffer), `n`, `idx`, `rel`, `end` (= idx + 1) and `NAN`, with placeholders `{start}` (the
    window's first index), `{col}` (the column's offset in `s`), `{scale}`, `{lookback}` and
    `{shared}` (the value named by `shared`, computed once for all the features that read it).
    `shared` is "sum" (the column's window sum, already divided by its scale; such a column keeps
    block sums on long keys) or "max" / "min" (the builtin over the column's window, unscaled);
    nested windows of one column extend each other's instead of re-reading the shorter window.
    """

    reference: Reference
    template: str | None = None
    kernel_op: int | None = None  # None: Python only
    field: Literal["numeric", "categorical"] | None = None  # the kind of field it takes, if any
    windowed: bool = True  # False: it looks back as far as the entity's longest window
    delayed: bool = False  # it may be shifted back by a label delay
    labels: bool = False  # it reads the key's fraud labels
    geo: bool = False  # it reads the location (lat, lon)
    shared: Literal["sum", "max", "min"] | None = None
    integer_column: bool = False  # its fast paths need a column that is never absent
    title: str | None = None  # the head of its feature names (default: the aggregation's name)


# -- reference definitions ----------------------------------------------------------------------
# Each has the `Reference` signature; unused arguments keep one calling convention for all.


def _count(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    return float(idx + 1 - start)


def _scaled_sum(p: Context, d: Buffer, s: EntityState, j: int, o: int, start: int, end: int) -> float:
    """Column j's sum over [start, end) of an integer buffer, as a float of the field's unit."""
    pre = s.prefix
    raw = sum(d[o + start : o + end]) if pre is None else window_sum(d, pre, j, o, start, end, p.block)
    return raw / p.scales[j]


def _sum(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    o, end = 1 + (j + 1) * n, idx + 1
    if d.typecode != "d":
        return _scaled_sum(p, d, s, j, o, start, end)
    vals = [v for v in d[o + start : o + end] if v == v]
    return float(sum(vals)) if vals else NAN


def _mean(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    o, end = 1 + (j + 1) * n, idx + 1
    if d.typecode != "d":
        return _scaled_sum(p, d, s, j, o, start, end) / (end - start)
    vals = [v for v in d[o + start : o + end] if v == v]
    return sum(vals) / len(vals) if vals else NAN


def _window(p: Context, d: Buffer, n: int, j: int, start: int, idx: int) -> tuple[list[float], float]:
    """Numeric column j over the window: its present values, and this event's value (NaN if absent)."""
    window = numbers(d, n, j, start, idx + 1, p.scales[j])
    return [v for v in window if v == v], window[-1]


def _std_of(vals: list[float], mean: float) -> float:
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))


def _std(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    vals, _ = _window(p, d, n, j, start, idx)
    return _std_of(vals, sum(vals) / len(vals)) if vals else NAN


def _min(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    vals, _ = _window(p, d, n, j, start, idx)
    return min(vals) if vals else NAN


def _max(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    vals, _ = _window(p, d, n, j, start, idx)
    return max(vals) if vals else NAN


def _ratio_to_mean(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    vals, current = _window(p, d, n, j, start, idx)
    if not vals:
        return NAN
    mean = sum(vals) / len(vals)
    return current / mean if mean > 0 else NAN


def _zscore(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    vals, current = _window(p, d, n, j, start, idx)
    if not vals:
        return NAN
    mean = sum(vals) / len(vals)
    std = _std_of(vals, mean)
    return (current - mean) / std if std > 0 else NAN


def _distinct(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    o = 1 + (j + 1) * n
    return float(len({c for c in d[o + start : o + idx + 1] if c}))  # categorical hashes; 0 = absent


def _is_new(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    o = 1 + (j + 1) * n
    c = d[o + idx]
    return NAN if not c else float(c not in d[o + start : o + idx])


def _time_since_last(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    # The previous event is at position idx (times start at 1).
    return (rel - d[idx]) / 1000.0 if idx and d[idx] > rel - p.lookback_ms else NAN


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(a)))


def _previous_located(p: Context, d: Buffer, n: int, idx: int, rel: int) -> tuple[float, int] | None:
    """(km, time offset) of the newest earlier located event within the lookback, or None (this
    event or every such one has no location)."""
    lat_j, lon_j = p.lat_column, p.lon_column
    o_lat, o_lon = 1 + (lat_j + 1) * n, 1 + (lon_j + 1) * n
    if d.typecode == "d":
        lat, lon = d[o_lat + idx], d[o_lon + idx]
        if lat != lat:
            return None
    else:
        c = d[o_lat + idx]
        if c == MISSING:
            return None
        lat, lon = c / p.scales[lat_j], d[o_lon + idx] / p.scales[lon_j]
    oldest = rel - p.lookback_ms
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
            km = haversine_km(c / p.scales[lat_j], d[o_lon + i] / p.scales[lon_j], lat, lon)
        return km, ti
    return None


def _distance_km(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    found = _previous_located(p, d, n, idx, rel)
    return NAN if found is None else found[0]


def _speed_kmh(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    found = _previous_located(p, d, n, idx, rel)
    if found is None:
        return NAN
    km, ti = found
    return km / max((rel - ti) / 3_600_000, MINUTE_H)


# Label aggregations read (t - delay - w, t - delay]: the fraud labels known by t of the key's
# transactions there, or (`delayed_count`) those transactions.


def _frauds(s: EntityState, t: int, lo: int, hi: int) -> int:
    """Labels known by `t` on the key's transactions in (lo, hi] (epoch ms)."""
    if s.labels is None:
        return 0
    txns, known = s.labels
    return sum(1 for i in range(bisect_right(txns, lo), bisect_right(txns, hi)) if known[i] <= t)


def _transactions(p: Context, d: Buffer, n: int, lo: int, hi: int) -> int:
    """The key's transactions in (lo, hi] (epoch ms)."""
    base = origin(d, p.bias)
    with memoryview(d) as view:
        return bisect_right(view, hi - base, 1, 1 + n) - bisect_right(view, lo - base, 1, 1 + n)


def _label_count(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    t = origin(d, p.bias) + rel
    return float(_frauds(s, t, t - delay - w, t - delay))


def _label_rate(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    t = origin(d, p.bias) + rel
    hi, lo = t - delay, t - delay - w
    frauds = _frauds(s, t, lo, hi)
    count = _transactions(p, d, n, lo, hi)
    return frauds / count if count else NAN


def _delayed_count(
    p: Context, d: Buffer, n: int, s: EntityState, idx: int, rel: int, start: int, j: int, w: int, delay: int
) -> float:
    t = origin(d, p.bias) + rel
    return float(_transactions(p, d, n, t - delay - w, t - delay))


# -- the table ----------------------------------------------------------------------------------

AGGREGATIONS: dict[str, Aggregation] = {
    # kernel_op: the value of its OP_* in features/_kernel.c (OP_COUNT = 0 ... OP_SINCE_LAST = 6,
    # OP_PYTHON = 7, then OP_RATIO_TO_MEAN = 8 ... OP_LABEL_RATE = 14, OP_DISTANCE = 15, OP_SPEED = 16)
    "count": Aggregation(_count, "float(end - {start})", kernel_op=0),
    "sum": Aggregation(_sum, "{shared}", kernel_op=1, field="numeric", shared="sum", integer_column=True),
    "mean": Aggregation(
        _mean, "{shared} / (end - {start})", kernel_op=2, field="numeric", shared="sum", integer_column=True
    ),
    "std": Aggregation(_std, kernel_op=10, field="numeric"),
    "min": Aggregation(
        _min, "{shared} / {scale}", kernel_op=4, field="numeric", shared="min", integer_column=True
    ),
    "max": Aggregation(
        _max, "{shared} / {scale}", kernel_op=3, field="numeric", shared="max", integer_column=True
    ),
    "distinct": Aggregation(
        _distinct,
        "float(len(set(s[{col} + {start}:{col} + end]).difference((0,))))",
        kernel_op=5,
        field="categorical",
    ),
    "is_new": Aggregation(_is_new, kernel_op=11, field="categorical"),
    "time_since_last": Aggregation(
        _time_since_last,
        "((rel - s[idx]) / 1000.0 if idx and s[idx] > rel - {lookback} else NAN)",
        kernel_op=6,
        windowed=False,
    ),
    "ratio_to_mean": Aggregation(_ratio_to_mean, kernel_op=8, field="numeric"),
    "zscore": Aggregation(_zscore, kernel_op=9, field="numeric"),
    "distance_km": Aggregation(_distance_km, kernel_op=15, windowed=False, geo=True),
    "speed_kmh": Aggregation(_speed_kmh, kernel_op=16, windowed=False, geo=True),
    "label_count": Aggregation(_label_count, kernel_op=13, delayed=True, labels=True, title="fraud_count"),
    "label_rate": Aggregation(_label_rate, kernel_op=14, delayed=True, labels=True, title="fraud_rate"),
    "delayed_count": Aggregation(_delayed_count, kernel_op=12, delayed=True),
}
"""Every aggregation, by the name a `WindowFeature` declares. Adding one is adding an entry here
(and, for a compiled fast path, its op in features/_kernel.c): docs/features.md, "Adding an
aggregation"."""
