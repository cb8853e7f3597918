"""The buffer layout: one key's events inside the retention horizon, in ONE flat typed buffer.

An `EntityState` is one key's events (longest window + label delay + allowed lateness), sorted by
event time; the state object is the array:

    [base, t_0 .. t_{n-1}, c0_0 .. c0_{n-1}, c1_0 .. c1_{n-1}, ...]

`base` is the key's time origin in minutes; event times are millisecond offsets from it, signed
32-bit with a 2**31 bias (a 49.7-day span; plans that look back further use 64-bit 'q' buffers
with no origin). Numeric columns are scaled integers that are exactly the float that arrived
(amounts in cents, coordinates in 1e-7 degrees), categorical columns 32-bit hashes (0 = absent).
A key whose value cannot be stored exactly (a non-cent amount, a NaN...) is widened for good: its
events move to a float64 buffer of the same layout in the `wide` slot. The snapshot is one bytes
object. Long keys keep block sums of their summed columns (`Prefix`).

This module knows the layout only: which columns a plan stores and how its features are computed
are in `features.plan` and `features.aggregations`.
"""

from __future__ import annotations

import math
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

NAN = float("nan")
MINUTE_MS = 60_000
OFFSET_LIMIT = 2**32  # a 32-bit buffer spans 2**32 ms (49.7 days) of event time
BIAS = 2**31  # offsets are stored signed: t - base - BIAS
INT_LIMIT = 2**31
MISSING = -(2**31)  # an absent coordinate in an integer column (never a valid scaled value)
SNAPSHOT_FORMAT = "state/2"  # bumped whenever the snapshot layout changes
# Plans read the following when they are built (tests shrink them to reach the long-key paths).
PREFIX_MIN = 128  # keys this long keep block sums (`Prefix`): window sums of hot merchants in O(block)
PREFIX_BLOCK = 32  # events per block: one int64 running total per block
SMALL_BLOCK = 512  # CPython's small-object allocator serves up to this many bytes
PRESIZE_AT = 8  # a key reaching this many events gets a buffer past SMALL_BLOCK at once (`presize`)
LAZY_MIN = 1024  # keys this long evict expired events in batches (see `features.codegen`), not one by one
LAZY_SHIFT = 5  # ... once more than n >> LAZY_SHIFT (n/32) of their n events have expired
SCALES = {"lat": 10**7, "lon": 10**7}  # integer units per 1.0; other numeric fields: cents
GEO_FIELDS = ("lat", "lon")


def stable_hash(value: str) -> int:
    """A non-zero 32-bit hash that is the same in every process (Python's `hash` is salted)."""
    return zlib.crc32(value.encode()) or 1


def signed(h: int) -> int:
    """A 32-bit unsigned hash as the signed value stored in the buffer (0 stays 0 = absent)."""
    return (h ^ 0x80000000) - 0x80000000


def scaled(v: float, scale: int) -> int | None:
    """`v` as an integer number of 1/scale units when that is exact and fits 32 bits, else None."""
    if v != v or v in (math.inf, -math.inf):
        return None
    c = round(v * scale)
    return c if c / scale == v and -INT_LIMIT < c < INT_LIMIT else None


def events_in(d: Sequence[Any], width: int) -> int:
    """Events in buffer `d` of `width` segments (empty: a new key, or the emptied buffer of a
    widened one)."""
    return (len(d) - 1) // width if len(d) else 0


def origin(d: Sequence[Any], bias: int) -> int:
    """The epoch ms that buffer `d`'s time offsets count from."""
    return int(d[0]) * MINUTE_MS + bias


def numbers(d: array[Any], n: int, j: int, start: int, end: int, scale: int) -> list[float]:
    """Numeric column `j` of buffer `d` (`n` events), events [start, end), as floats (NaN where
    absent); `scale` is the column's integer units per 1.0."""
    o = 1 + (j + 1) * n
    if d.typecode == "d":
        return list(d[o + start : o + end])
    return [NAN if c == MISSING else c / scale for c in d[o + start : o + end]]


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
    allocation: the key then grows in place for a while. Only allocation changes. What it saves
    and costs is measured in docs/benchmarks.md and docs/features.md ("Speed and memory").
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
    (this buffer is then empty); `labels` is None while the key holds no fraud label, else
    (transaction times, label times) of those it holds; `prefix` (derived, never snapshotted) is None or the block sums of the
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


# -- block sums ---------------------------------------------------------------------------------


def build_prefix(s: EntityState, n: int, summed: Sequence[int], block: int) -> None:
    """Give key `s` (`n` events) the block sums of its columns `summed`."""
    s.prefix = Prefix(
        {
            j: array(
                "q",
                accumulate(
                    (sum(s[o + i : o + i + block]) for i in range(0, n - block + 1, block)), initial=0
                ),
            )
            for j in summed
            for o in (1 + (j + 1) * n,)
        }
    )


def update_prefix(s: EntityState, n: int, idx: int, block: int) -> None:
    """After an insertion at `idx` (n events now): recompute the blocks from the one holding it."""
    pre = s.prefix
    assert pre is not None
    e = pre.shift
    for j, p in pre.sums.items():
        o = 1 + (j + 1) * n
        del p[(idx + e) // block + 1 :]
        for k in range(len(p), (n + e) // block + 1):  # block 0 holds only block - e events
            p.append(p[-1] + sum(s[o + max(0, (k - 1) * block - e) : o + k * block - e]))


def shrink_prefix(s: EntityState, n: int, k: int, block: int) -> None:
    """After `k` events were evicted from the front (n left): drop the blocks they emptied."""
    pre = s.prefix
    assert pre is not None
    if n < block:
        s.prefix = None
        return
    pre.shift += k
    whole = pre.shift // block
    if whole:
        pre.shift -= whole * block
        for p in pre.sums.values():
            del p[:whole]


def evict_labels(s: EntityState, horizon: int) -> None:
    """Drop the labels of transactions at or before `horizon` (epoch ms); a key left with none
    goes back to `labels = None`, as if never labelled (its events then skip the label reads)."""
    assert s.labels is not None
    txns, known = s.labels
    m = bisect_right(txns, horizon)
    if m == len(txns):
        s.labels = None
    elif m:
        del txns[:m]
        del known[:m]
