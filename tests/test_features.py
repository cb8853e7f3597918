"""The feature engine against a brute-force recomputation over the raw events."""

from __future__ import annotations

import math
import os
import pickle
import sys
import zlib
from array import array
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features import aggregations, buffer
from features import engine as engine_module
from features.aggregations import haversine_km
from features.buffer import EntityState, stable_hash
from features.catalog import FEATURES, LABEL_DELAY
from features.engine import FeatureEngine, FeaturePipeline, FeatureVector, LabelEvent, txn_features
from features.events import DeadLetter, Label, Transaction
from features.plan import EntityPlan
from features.spec import Entity, FeatureSet, SpecError, WindowFeature, duration_ms, expand
from testkit.values import same

CARD = Entity("card", ("card_id",))
MERCHANT = Entity("merchant", ("merchant_id",))
DEVICE = Entity("device", ("device_id",))
PAIR = Entity("card_merchant", ("card_id", "merchant_id"))

WIDE = FeatureSet(
    windows=(
        *expand(CARD, ["count"], ["1s", "1m", "1h", "1d", "90d"]),
        *expand(
            CARD,
            ["sum", "mean", "std", "min", "max", "ratio_to_mean", "zscore"],
            ["1s", "1h", "90d"],
            "amount",
        ),
        WindowFeature(CARD, "time_since_last"),
        WindowFeature(CARD, "distance_km"),
        WindowFeature(CARD, "speed_kmh"),
        *expand(CARD, ["distinct", "is_new"], ["1m", "7d"], "merchant_id"),
        WindowFeature(CARD, "is_new", "device_id", "30d"),
        WindowFeature(CARD, "label_count", window="30d"),
        WindowFeature(CARD, "label_rate", window="7d", label_delay="1d"),
        WindowFeature(CARD, "delayed_count", window="1h", label_delay="1d"),
        *expand(MERCHANT, ["count"], ["1h", "7d"]),
        WindowFeature(MERCHANT, "distinct", "card_id", "1d"),
        WindowFeature(MERCHANT, "label_rate", window="30d"),
        WindowFeature(DEVICE, "count", window="1d"),
        WindowFeature(DEVICE, "time_since_last"),
        WindowFeature(PAIR, "sum", "amount", "1d"),
    )
)
LATENESS_MS = 60_000
COMPILED = aggregations.KERNEL  # features._kernel's window reads, or None where it is not built


# `tests/test_kernel_sanitized.py` runs the kernel's tests again under AddressSanitizer, some four
# times slower: it asks for the compiled kernel only (FRAUD_TEST_KERNELS=compiled) and a third of
# each test's examples (FRAUD_TEST_EXAMPLES=0.3); the suite itself runs both kernels, every example.
KERNELS = os.environ.get("FRAUD_TEST_KERNELS", "compiled,python").split(",")
EXAMPLES = float(os.environ.get("FRAUD_TEST_EXAMPLES", "1"))


def examples(n: int) -> int:
    return max(10, round(n * EXAMPLES))


@pytest.fixture(autouse=True, scope="module", params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs twice (`KERNELS`): plans built with the compiled window reads, and without."""
    if request.param == "compiled" and COMPILED is None:
        pytest.skip("features._kernel is not built in this install (no C compiler when installing?)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aggregations, "KERNEL", COMPILED if request.param == "compiled" else None)
        yield request.param


T0 = 1_767_225_600_000
GAPS = [0, 1, 500, 1_000, 30_000, 600_000, 7_200_000, 86_400_000, 20 * 86_400_000]
CITIES = [(48.85, 2.35), (52.52, 13.40), (40.42, -3.70)]


def key(entity: Entity, t: Transaction) -> str | None:
    parts = [getattr(t, f) for f in entity.fields]
    return None if any(p is None for p in parts) else "|".join(parts)


def brute_force(
    f: WindowFeature,
    t: Transaction,
    arrived: list[Transaction],
    frauds: dict[str, tuple[int, int]],
    lookback: int,
) -> float:
    """The definition, by scanning every earlier arrival; `arrived` ends with `t` itself."""
    k = key(f.entity, t)
    if k is None:
        return math.nan
    hist = [(i, x) for i, x in enumerate(arrived) if key(f.entity, x) == k and x.ts_ms <= t.ts_ms]
    before = hist[:-1]
    now = t.ts_ms
    if f.agg == "time_since_last":
        prev = [x.ts_ms for _, x in before if x.ts_ms > now - lookback]
        return (now - max(prev)) / 1000 if prev else math.nan
    if f.agg in ("distance_km", "speed_kmh"):
        located = [(x.ts_ms, i, x) for i, x in before if x.lat is not None and x.ts_ms > now - lookback]
        if t.lat is None or not located:
            return math.nan
        _, _, p = max(located, key=lambda r: (r[0], r[1]))
        km = haversine_km(p.lat, p.lon, t.lat, t.lon)  # type: ignore[arg-type]
        return km if f.agg == "distance_km" else km / max((now - p.ts_ms) / 3_600_000, 1 / 60)
    if f.agg in ("label_count", "label_rate", "delayed_count"):
        lo, hi = now - f.delay_ms - f.window_ms, now - f.delay_ms
        txns = [x for _, x in hist if lo < x.ts_ms <= hi]
        if f.agg == "delayed_count":
            return float(len(txns))
        n_fraud = sum(1 for x in txns if x.txn_id in frauds and frauds[x.txn_id][1] <= now)
        if f.agg == "label_count":
            return float(n_fraud)
        return n_fraud / len(txns) if txns else math.nan
    win = [x for _, x in hist if x.ts_ms > now - f.window_ms]
    if f.agg == "count":
        return float(len(win))
    if f.agg == "distinct":
        return float(len({getattr(x, f.field) for x in win if getattr(x, f.field) is not None}))  # type: ignore[arg-type]
    if f.agg == "is_new":
        v = getattr(t, f.field)  # type: ignore[arg-type]
        return math.nan if v is None else float(v not in {getattr(x, f.field) for x in win[:-1]})  # type: ignore[arg-type]
    vals = [x.amount for x in win]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return {
        "sum": sum(vals), "mean": mean, "std": std, "min": min(vals), "max": max(vals),
        "ratio_to_mean": t.amount / mean if mean > 0 else math.nan,
        "zscore": (t.amount - mean) / std if std > 0 else math.nan,
    }[f.agg]  # fmt: skip


@st.composite
def event_streams(draw: st.DrawFn, gaps: list[int] = GAPS, most: int = 45) -> list[Transaction | Label]:
    n = draw(st.integers(1, most))
    ts = T0
    txns: list[Transaction] = []
    for i in range(n):
        ts += draw(st.sampled_from(gaps))
        loc = draw(st.sampled_from([None, *CITIES]))
        txns.append(
            Transaction(
                f"t{i}", ts, draw(st.sampled_from(["c1", "c2", "c3"])), draw(st.sampled_from(["m1", "m2", "m3"])),
                draw(st.sampled_from([0.0, 1.0, 9.99, 250.0, 1e4, 0.125, 1 / 3])),
                device_id=draw(st.sampled_from([None, "d1", "d2"])),
                lat=None if loc is None else loc[0], lon=None if loc is None else loc[1],
            )
        )  # fmt: skip
    # Arrival order: event time plus a jitter, mostly within the allowed lateness, sometimes beyond.
    jitter = st.integers(0, LATENESS_MS) | st.integers(0, 3 * LATENESS_MS)
    arrivals: list[tuple[int, int, Transaction | Label]] = [
        (t.ts_ms + draw(jitter), i, t) for i, t in enumerate(txns)
    ]
    for i, t in enumerate(txns):
        if draw(st.booleans()):
            label_ts = t.ts_ms + draw(st.sampled_from([0, 60_000, 86_400_000, 10 * 86_400_000]))
            arrivals.append((label_ts + draw(jitter), n + i, Label(t.txn_id, draw(st.booleans()), label_ts)))
    return [e for _, _, e in sorted(arrivals, key=lambda a: (a[0], a[1]))]


# Short windows: keys evict all the time, so the lazy eviction of long keys is exercised too.
SHORT = FeatureSet(
    windows=(
        *expand(CARD, ["sum", "mean", "max"], ["1s", "1m", "1h"], "amount"),
        WindowFeature(CARD, "count", window="1h"),
        WindowFeature(CARD, "time_since_last"),
        WindowFeature(CARD, "distance_km"),
        WindowFeature(CARD, "is_new", "merchant_id", "1h"),
        WindowFeature(CARD, "label_count", window="1h"),
        WindowFeature(MERCHANT, "label_rate", window="1m", label_delay="1m"),
        WindowFeature(MERCHANT, "delayed_count", window="1h", label_delay="1m"),
        *expand(MERCHANT, ["sum"], ["1s", "1h"], "amount"),
    )
)


@pytest.mark.parametrize(
    ("features", "prefix", "lazy"),
    [
        (
            WIDE,
            (buffer.PREFIX_MIN, buffer.PREFIX_BLOCK),
            (buffer.LAZY_MIN, buffer.LAZY_SHIFT),
        ),
        (WIDE, (2, 2), (buffer.LAZY_MIN, buffer.LAZY_SHIFT)),
        (WIDE, (3, 3), (buffer.LAZY_MIN, buffer.LAZY_SHIFT)),
        (SHORT, (3, 3), (2, 1)),  # block sums, and expired events dropped once half the key has
    ],
    ids=["scans", "block-sums-2", "block-sums-3", "short-windows-lazy-eviction"],
)
@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=event_streams())
def test_features_equal_brute_force(
    features: FeatureSet, prefix: tuple[int, int], lazy: tuple[int, int], events: list[Transaction | Label]
) -> None:
    """Both sum paths: window scans (short keys) and block sums (keys past PREFIX_MIN events); both
    eviction schedules: each expired event at once, and in batches (keys past LAZY_MIN events)."""
    with long_key_thresholds(prefix, lazy):
        pipeline = FeaturePipeline(features, LATENESS_MS)
    check_against_brute_force(events, pipeline)


@contextmanager
def long_key_thresholds(prefix: tuple[int, int], lazy: tuple[int, int]) -> Iterator[None]:
    """Plans built inside take these (min events, block) for block sums, (min events, shift) for
    batched eviction."""
    m = buffer
    saved = m.PREFIX_MIN, m.PREFIX_BLOCK, m.LAZY_MIN, m.LAZY_SHIFT
    (m.PREFIX_MIN, m.PREFIX_BLOCK), (m.LAZY_MIN, m.LAZY_SHIFT) = prefix, lazy
    try:
        yield
    finally:
        m.PREFIX_MIN, m.PREFIX_BLOCK, m.LAZY_MIN, m.LAZY_SHIFT = saved


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=event_streams(gaps=[0, 1_000, 60_000, 600_000, 1_200_000], most=80))  # ~SHORT's windows
def test_long_key_paths_change_no_value(events: list[Transaction | Label]) -> None:
    """Late events included: block sums, and dropping expired events in batches, give what window
    scans and dropping each expired event at once give (every key here is "long")."""
    engines = []
    for prefix, lazy in [((10**9, 3), (10**9, 0)), ((3, 3), (2, 1)), ((2, 2), (10**9, 0))]:
        with long_key_thresholds(prefix, lazy):
            engines.append(FeatureEngine(FeaturePipeline(SHORT, LATENESS_MS)))
    for e in events:
        reference, *others = (engine.process(e) for engine in engines)
        if isinstance(reference, FeatureVector):
            for out in others:
                assert isinstance(out, FeatureVector) and out.late == reference.late
                assert all(map(same, reference.values, out.values)), (e, reference.values, out.values)


def test_block_sums_after_an_insertion_into_a_partly_evicted_block() -> None:
    """Ten events a minute apart, one at 62 min (t0 and t1 expire: the first block is partly
    evicted), then a late one at 1.5 min, inserted into that block; then more in-order events."""
    minutes = [*range(10), 62, 1.5, 63, 64, 70]
    events = [Transaction(f"t{i}", T0 + int(m * 60_000), "c1", "m1", 1.0 + i) for i, m in enumerate(minutes)]
    engines = []
    for prefix in [(10**9, 3), (3, 3)]:
        with long_key_thresholds(prefix, (10**9, 0)):
            engines.append(FeatureEngine(FeaturePipeline(SHORT, LATENESS_MS)))
    for e in events:
        reference, blocks = (engine.process(e) for engine in engines)
        assert isinstance(reference, FeatureVector) and isinstance(blocks, FeatureVector)
        assert all(map(same, reference.values, blocks.values)), (e.txn_id, reference.values, blocks.values)
    assert engines[1].states[0]["card:c1"].prefix is not None  # the block sums were in use


def test_late_event_does_not_see_expired_events_left_in_place() -> None:
    """One event a minute for 70 minutes: with 61 minutes of retention, ten have expired, and a
    key dropping them in batches still holds them. An event 2 minutes late must not count them."""
    with long_key_thresholds((buffer.PREFIX_MIN, buffer.PREFIX_BLOCK), (2, 1)):
        engine = FeatureEngine(FeaturePipeline(SHORT, LATENESS_MS))
    for i in range(71):
        engine.process(Transaction(f"t{i}", T0 + i * 60_000, "c1", "m1", 1.0))
    assert engine.pipeline.plans[0].count(engine.states[0]["card:c1"]) == 71  # ten expired, kept
    late = engine.process(Transaction("late", T0 + 68 * 60_000, "c1", "m1", 1.0))
    assert isinstance(late, FeatureVector) and late.late
    # Its window (t - 1h, t] reaches back to t9, which has expired: it counts t10..t68 and itself.
    assert late.values[SHORT.names.index("count_by_card_1h")] == 60.0
    assert engine.pipeline.plans[0].count(engine.states[0]["card:c1"]) == 62


def exactly_equal(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True)
    )


def both_kernels(
    features: FeatureSet, lateness_ms: int = LATENESS_MS
) -> tuple[FeaturePipeline, FeaturePipeline]:
    """The same feature set compiled twice: with features._kernel, and in pure Python."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aggregations, "KERNEL", COMPILED)
        compiled = FeaturePipeline(features, lateness_ms)
        mp.setattr(aggregations, "KERNEL", None)
        return compiled, FeaturePipeline(features, lateness_ms)


@pytest.mark.skipif(COMPILED is None, reason="features._kernel is not built in this install")
@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=event_streams())
def test_compiled_window_reads_give_the_python_floats_bit_for_bit(
    kernel: str, events: list[Transaction | Label]
) -> None:
    if kernel == "python":
        pytest.skip("builds both kernels itself: once is enough")
    compiled, python = (FeatureEngine(p) for p in both_kernels(WIDE))
    for event in events:
        a, b = compiled.process(event), python.process(event)
        if isinstance(a, FeatureVector):
            assert isinstance(b, FeatureVector) and a.late == b.late
            assert exactly_equal(a.values, b.values), (event, a.values, b.values)


@settings(max_examples=examples(100), deadline=None)
@given(
    ids=st.lists(st.sampled_from(["c1", "m1", "d1", "", "é", "a|b"]) | st.none(), min_size=3, max_size=3),
)
def test_generated_keys_are_each_plans_key(ids: list[str | None]) -> None:
    """`FeaturePipeline.keys_of` (one generated expression) gives what each plan's `key_of` gives,
    an empty or missing field included; a two-field entity (card x merchant) too."""
    card, merchant, device = ids
    txn = Transaction("t1", T0, card, merchant, 1.0, device_id=device)  # type: ignore[arg-type]
    for features in (WIDE, FeatureSet(windows=(WindowFeature(PAIR, "count", window="1h"),))):
        pipeline = FeaturePipeline(features, LATENESS_MS)
        keys = pipeline.keys_of(txn)
        assert keys == tuple(p.key_of(txn) for p in pipeline.plans)


def key_state(s: EntityState) -> tuple[object, ...]:
    """Everything a key holds: its buffer (and the memory it takes), the widened one, its labels
    and its block sums."""
    prefix = s.prefix
    sums = None if prefix is None else (prefix.shift, {j: q.tolist() for j, q in prefix.sums.items()})
    labels = None if s.labels is None else tuple(a.tolist() for a in s.labels)
    wide = None if s.wide is None else s.wide.tobytes()  # bytes: NaN == NaN, bit for bit
    return s.typecode, s.tobytes(), sys.getsizeof(s), wide, labels, sums


def outcome(fn: object, s: EntityState, txn: Transaction) -> tuple[object, ...]:
    try:
        values, late = fn(s, txn)  # type: ignore[operator]
    except Exception as exc:  # the compiled append must raise what the generated code raises
        return ("raised", type(exc), str(exc))
    return ("values", [("nan" if math.isnan(v) else v) for v in values], late)


STORABLE = [0.0, 1.0, 9.99, 250.0, 21474836.47, 0.125]  # amounts the fast path stores
ODD_NUMBERS = [-0.0, 0.005, 0.015, 2.675, 1 / 3, 1e-9, 21474836.48, 1e300, -5.0, math.inf, math.nan]
ODD_NUMBERS += [7, True, None]  # an int, a bool, None: not floats
TEXT = ["m1", "m2", "", "é", "日本"]
ODD_TEXT = ["\udc80", None]  # a lone surrogate has no UTF-8


@st.composite
def odd_streams(draw: st.DrawFn, retention_ms: int) -> list[tuple[str, Transaction | tuple[int, int]]]:
    """Transactions mostly in order and mostly storable, with now and then a value of any kind a
    field can hold (valid or not), gaps of exactly the key's retention, and fraud labels."""
    ts, out = T0, []
    gaps = [-120_000, -1, 0, 1, 1_000, 60_000, 3_600_000, retention_ms, retention_ms + 1, 40 * 86_400_000]
    odd = st.integers(0, 19).map(lambda i: i == 0)  # one value in twenty is odd
    for i in range(draw(st.integers(1, 80))):
        ts += draw(st.sampled_from(gaps))
        if draw(st.integers(0, 9)) == 0:
            out.append(("label", (ts - draw(st.sampled_from([0, 1, 60_000, 600_000])), ts)))
            continue
        number = st.sampled_from(ODD_NUMBERS if draw(odd) else STORABLE)
        text = [draw(st.sampled_from(ODD_TEXT if draw(odd) else TEXT)) for _ in range(3)]
        loc = draw(st.sampled_from([(None, None), (48.85, 2.35), (52.5362, 13.3754)]))
        if draw(odd):
            loc = draw(st.sampled_from([(91.0, 2.35), (math.nan, 2.35), (48.85, None), (1e-8, 2.35)]))
        out.append(
            ("txn", Transaction(
                f"t{i}", ts, "c1", text[0], draw(number), country=text[1], device_id=text[2], lat=loc[0], lon=loc[1]
            ))
        )  # fmt: skip
    return out


@pytest.mark.skipif(COMPILED is None, reason="features._kernel is not built in this install")
@pytest.mark.parametrize(
    ("features", "prefix", "lazy"),
    [
        (WIDE, (buffer.PREFIX_MIN, buffer.PREFIX_BLOCK), (buffer.LAZY_MIN, buffer.LAZY_SHIFT)),
        (SHORT, (3, 3), (2, 1)),
    ],
    ids=["wide", "short-block-sums-lazy-eviction"],
)
@settings(max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_compiled_append_changes_a_key_as_the_generated_code_does(
    kernel: str, features: FeatureSet, prefix: tuple[int, int], lazy: tuple[int, int], data: st.DataObject
) -> None:
    """`features._kernel.Appender` (the compiled in-order append) against the generated Python it
    hands everything else to: the same values, the same exceptions, and the key left byte for byte
    the same, whatever the fields hold (floats not exactly storable, ints, NaN, non-ASCII and
    unencodable text), out-of-order events, re-basing, block sums and lazy eviction."""
    if kernel == "python":
        return  # compiled plans only
    with long_key_thresholds(prefix, lazy):
        plan = FeaturePipeline(features, LATENESS_MS).plans[0]
    appender = plan.observe_fn
    assert type(appender) is aggregations.APPENDER
    a, b = plan.new_state(), plan.new_state()
    for kind, event in data.draw(odd_streams(plan.retention_ms)):
        if kind == "label":
            plan.observe_label(a, *event)
            plan.observe_label(b, *event)
        else:
            assert outcome(appender, a, event) == outcome(appender.fallback, b, event), event
        assert key_state(a) == key_state(b), event


@pytest.mark.skipif(COMPILED is None, reason="features._kernel is not built in this install")
def test_compiled_append_refuses_a_malformed_header() -> None:
    """A header that does not describe the columns named is refused when the appender is built."""
    with pytest.raises(ValueError, match="malformed appender header"):
        aggregations.APPENDER(b"\0" * 8, ("ts_ms",), b"", *[None] * 5, (), None)
    header = array("q", [4, 2, buffer.BIAS, 1, buffer.INT_LIMIT, 60_000, 5, 1024, 8, 128, 32, 1, 0, 100, 0])
    args = (b"", *[None] * 5, (), None)
    assert type(aggregations.APPENDER(header.tobytes(), ("ts_ms", "amount"), *args)) is aggregations.APPENDER
    # a column too few, one too many, a number without a scale, a column of no kind
    for tail in ([], [0, 100, 0, 1, 0, 0], [0, 0, 0], [2, 100, 0]):
        words = header[:-3] + array("q", tail)
        with pytest.raises(ValueError, match="malformed appender header"):
            aggregations.APPENDER(words.tobytes(), ("ts_ms", "amount"), *args)


@pytest.mark.skipif(COMPILED is None, reason="features._kernel is not built in this install")
@pytest.mark.parametrize("blocks", [False, True])
def test_compiled_reads_match_python_on_any_buffer_contents(blocks: bool) -> None:
    """Values the encoder never stores (past 2**53 in sum, 300 categories in a window, absent
    amounts among present ones), 64-bit buffers, with and without block sums, labels known before
    and after the event: the kernel still returns Python's floats."""
    card = (
        *expand(CARD, ["count"], ["1m", "90d"]),
        *expand(CARD, ["sum", "mean", "max", "min"], ["1m", "90d"], "amount"),
        *expand(CARD, ["std", "ratio_to_mean", "zscore"], ["1m", "90d"], "amount"),
        WindowFeature(CARD, "is_new", "merchant_id", "90d"),
        WindowFeature(CARD, "delayed_count", window="1m", label_delay="30s"),
        WindowFeature(CARD, "label_count", window="90d"),
        WindowFeature(CARD, "label_rate", window="1m", label_delay="10s"),
        WindowFeature(CARD, "distance_km"),
        WindowFeature(CARD, "speed_kmh"),
        WindowFeature(CARD, "distinct", "merchant_id", "90d"),
        WindowFeature(CARD, "time_since_last"),
    )
    compiled, python = (p.plans[0] for p in both_kernels(FeatureSet(windows=card)))
    assert compiled.code == "q" and compiled.fields[:2] == ["amount", "lat"]
    n, width = 300, compiled.width
    s = EntityState("q")
    s.append(0)
    s.extend(i * 1_000 for i in range(n))  # times (ms)
    # amounts: a 90-day sum past 2**53, and every 11th absent
    s.extend(2**50 + 7 * i if i % 11 else buffer.MISSING for i in range(n))
    for field in compiled.fields[1:]:
        if field == "merchant_id":
            s.extend(0 if i % 7 == 0 else i % 280 + 1 for i in range(n))  # categories, 0 = absent
        elif field in ("lat", "lon"):  # degrees x 1e7, every 5th absent, some past 2**53
            base = 40 if field == "lat" else -3
            s.extend(
                buffer.MISSING if i % 5 == 0 else 2**55 + i if i % 13 == 0 else (base * 10**7 + i * 99_991)
                for i in range(n)
            )
        else:
            s.extend(buffer.MISSING for _ in range(n))
    assert len(s) == 1 + width * n
    s.labels = (array("q", range(0, n * 1_000, 3_000)), array("q", range(5_000, n * 1_000 + 5_000, 3_000)))
    if blocks:
        compiled.build_prefix(s, n)
        assert s.prefix is not None
    for idx in (0, 1, 11, 59, 144, 150, 151, 154, 156, n - 1):
        rel = idx * 1_000
        a, b = compiled.compute_fast(s, n, idx, rel), python.compute_fast(s, n, idx, rel)
        assert exactly_equal(a, b), (idx, a, b)
        assert sum(v == v for v in a) > len(a) // 2, a  # mostly values, not NaN
    assert a[0] == 60.0 and a[1] == float(n) and a[-2] == float(len({i % 280 + 1 for i in range(n) if i % 7}))


@pytest.mark.skipif(COMPILED is None, reason="features._kernel is not built in this install")
def test_kernel_refuses_a_buffer_that_does_not_match_its_program() -> None:
    compiled, _ = both_kernels(FeatureSet(windows=(WindowFeature(CARD, "sum", "amount", "1h"),)))
    plan: EntityPlan = compiled.plans[0]
    program = plan.kernel_program()
    s = EntityState("i")
    s.extend([0, 10, 20, 500, 600])  # base, 2 times, 2 amounts
    assert COMPILED(s, 2, 1, 20, program, None) == [11.0]
    bad_prefix = buffer.Prefix({0: array("q", [0])})
    bad_prefix.shift = plan.block
    for bad in (
        lambda: COMPILED(s, 3, 1, 20, program, None),  # more events than the buffer holds
        lambda: COMPILED(s, 2, 2, 20, program, None),  # no such event
        lambda: COMPILED(s, 2, 1, 20, program[:-8], None),  # truncated program
        lambda: COMPILED(EntityState("i"), 2, 1, 20, program, None),  # empty buffer
        lambda: COMPILED(s, 2, 1, 20, b"\x03" + program[1:], None),  # no such item size
        lambda: COMPILED(s, 2, 1, 20, program, bad_prefix),  # a shift past its block
    ):
        with pytest.raises(ValueError):
            bad()
    # A label feature reads the key's labels: they must be passed, as two int64 arrays.
    rate = WindowFeature(CARD, "label_rate", window="1h", label_delay="1s")
    compiled, _ = both_kernels(FeatureSet(windows=(rate,)))
    program = compiled.plans[0].kernel_program()
    s = EntityState("i")
    s.extend([0, 1000, 2000, 5000])  # base, 3 times (ms after the origin, 2**31)
    assert COMPILED(s, 3, 2, 5000, program, None, None) == [0.0]
    txns, known = array("q", [2**31 + 1000, 2**31 + 2000]), array("q", [2**31 + 1500, 2**31 + 6000])
    assert COMPILED(s, 3, 2, 5000, program, None, (txns, known)) == [0.5]  # one label is known by then
    bad_labels = [
        (array("q", [0]), array("q", [5, 6])),
        (array("i", [0]), array("i", [5])),
        (array("q", [0]),),
    ]
    with pytest.raises(TypeError):
        COMPILED(s, 3, 2, 5000, program, None)  # no labels at all
    for labels in bad_labels:
        with pytest.raises((TypeError, ValueError)):
            COMPILED(s, 3, 2, 5000, program, None, labels)


def check_against_brute_force(events: list[Transaction | Label], pipeline: FeaturePipeline) -> None:
    features = pipeline.feature_set
    engine = FeatureEngine(pipeline)
    lookback = {p.entity: p.lookback_ms for p in pipeline.plans}
    arrived: list[Transaction] = []
    frauds: dict[str, tuple[int, int]] = {}
    seen: set[str] = set()
    checked = 0
    for e in events:
        out = engine.process(e)
        if isinstance(e, Label):
            ok = e.txn_id in {t.txn_id for t in arrived} and e.txn_id not in seen
            assert isinstance(out, LabelEvent) == ok
            if ok:
                seen.add(e.txn_id)
                if e.is_fraud:
                    txn = next(t for t in arrived if t.txn_id == e.txn_id)
                    frauds[e.txn_id] = (txn.ts_ms, e.ts_ms)
            continue
        arrived.append(e)
        assert isinstance(out, FeatureVector)
        late = any(
            e.ts_ms < max(x.ts_ms for x in arrived if key(p.entity, x) == k) - LATENESS_MS
            for p in pipeline.plans
            if (k := key(p.entity, e)) is not None
        )
        assert out.late == late
        if out.late:
            continue
        expected = txn_features(e, features.txn) + [
            brute_force(f, e, arrived, frauds, lookback[f.entity]) for f in features.windows
        ]
        for name, got, want in zip(features.names, out.values, expected, strict=True):
            assert same(got, want, tol=1e-9), f"{name} of {e.txn_id}: engine {got} != brute force {want}"
        checked += 1
    assert checked >= 1 or not arrived  # the first arrival is never late, so something was compared


def test_window_edges_are_exclusive_at_t_minus_window() -> None:
    """An event exactly one window (or the lookback, for time since last) before another is out
    of it; one millisecond later it is in: (t - window, t]."""
    fs = FeatureSet(
        windows=(
            WindowFeature(CARD, "count", window="1h"),
            WindowFeature(CARD, "max", "amount", "1h"),
            WindowFeature(CARD, "time_since_last"),
        ),
        txn=(),
    )
    for gap, expected in ((3_600_000, [1.0, 2.0, math.nan]), (3_599_999, [2.0, 5.0, 3599.999])):
        engine = FeatureEngine(FeaturePipeline(fs, LATENESS_MS))
        engine.process(Transaction("a", T0, "c1", "m1", 5.0))
        out = engine.process(Transaction("b", T0 + gap, "c1", "m1", 2.0))
        assert isinstance(out, FeatureVector)
        assert exactly_equal(out.values, expected), (gap, out.values)


def test_late_flag_only_beyond_allowed_lateness() -> None:
    engine = FeatureEngine(FeaturePipeline(WIDE, LATENESS_MS))
    mk = lambda i, ts: Transaction(f"t{i}", ts, "c1", "m1", 10.0)  # noqa: E731
    assert not engine.process(mk(0, T0 + 120_000)).late  # type: ignore[union-attr]
    assert not engine.process(mk(1, T0 + 60_000)).late  # type: ignore[union-attr]  # exactly at the limit
    assert engine.process(mk(2, T0 + 59_999)).late  # type: ignore[union-attr]


def test_out_of_order_within_lateness_sees_only_earlier_event_time() -> None:
    engine = FeatureEngine(FeaturePipeline(FEATURES, LATENESS_MS))
    names = FEATURES.names
    first = engine.process(Transaction("a", T0 + 30_000, "c1", "m1", 100.0))
    second = engine.process(Transaction("b", T0, "c1", "m1", 5.0))
    assert isinstance(first, FeatureVector) and isinstance(second, FeatureVector)
    assert second.values[names.index("count_by_card_1h")] == 1.0
    assert second.values[names.index("amount_sum_by_card_1h")] == 5.0
    third = engine.process(Transaction("c", T0 + 40_000, "c1", "m2", 1.0))
    assert isinstance(third, FeatureVector)
    assert third.values[names.index("amount_sum_by_card_1h")] == 106.0
    assert third.values[names.index("time_since_last_by_card")] == 10.0


def test_merchant_risk_counts_only_labels_already_arrived() -> None:
    """The default merchant risk: the fraud rate over (t - delay - 7d, t - delay], counting the
    labels that had arrived by t."""
    delay = duration_ms(LABEL_DELAY)
    engine = FeatureEngine(FeaturePipeline(FEATURES, LATENESS_MS))
    rate = FEATURES.names.index(f"fraud_rate_by_merchant_7d_delay_{LABEL_DELAY}")
    engine.process(Transaction("a", T0, "c1", "m1", 10.0))
    engine.process(Transaction("b", T0 + 1000, "c2", "m1", 10.0))
    # The label is known only from T0 + delay + 1 day: a transaction before that must not see it.
    label = engine.process(Label("a", True, T0 + delay + 86_400_000))
    assert isinstance(label, LabelEvent)
    before = engine.process(Transaction("c", T0 + delay + 2000, "c3", "m1", 10.0))
    after = engine.process(Transaction("d", T0 + delay + 86_400_000, "c4", "m1", 10.0))
    assert isinstance(before, FeatureVector) and isinstance(after, FeatureVector)
    assert before.values[rate] == 0.0  # a and b are in its shifted window, the label not yet known
    assert after.values[rate] == pytest.approx(1 / 2)  # c is too recent for the shifted window


def test_a_key_whose_labels_all_left_holds_none() -> None:
    """A key's fraud labels leave with their transactions: once the last one's transaction is past
    the retention the key holds no labels (`labels` None, as if never labelled: its events then
    skip the label reads) and reads and holds exactly what a key never labelled does."""
    plan = FeaturePipeline(WIDE, LATENESS_MS).plans[0]  # the card, with label features
    assert plan.uses_labels
    labelled, never = plan.new_state(), plan.new_state()
    fraud_count = next(n for n in plan.names if n.startswith("fraud_count"))
    day = 86_400_000
    for n, t in enumerate([T0, T0 + 1_000, T0 + day, T0 + plan.retention_ms + day]):
        if n == 1:
            plan.observe_label(labelled, T0, T0 + 1)
        txn = Transaction(f"t{n}", t, "c1", "m1", 10.0)
        got, want = outcome(plan.observe_fn, labelled, txn), outcome(plan.observe_fn, never, txn)
        if n in (1, 2):  # the labelled transaction is still held: its label counts
            assert labelled.labels is not None and list(labelled.labels[0]) == [T0]
            assert got[1][plan.names.index(fraud_count)] == 1.0, got  # type: ignore[index]
    assert labelled.labels is None
    assert got == want and key_state(labelled) == key_state(never)


def test_labels_and_duplicates_become_dead_letters() -> None:
    engine = FeatureEngine(FeaturePipeline(FEATURES, LATENESS_MS))
    unknown = engine.process(Label("nope", True, T0))
    assert isinstance(unknown, DeadLetter) and unknown.reason == "unknown_txn"
    engine.process(Transaction("a", T0, "c1", "m1", 10.0))
    dup = engine.process(Transaction("a", T0, "c1", "m1", 10.0))
    assert isinstance(dup, DeadLetter) and dup.reason == "duplicate_txn" and dup.txn_id == "a"
    assert isinstance(engine.process(Label("a", False, T0)), LabelEvent)
    again = engine.process(Label("a", True, T0))
    assert isinstance(again, DeadLetter) and again.reason == "duplicate_label"


@pytest.mark.parametrize("sweep_every", [1, 10**9])
def test_a_transaction_is_forgotten_exactly_at_its_ttl_whenever_the_sweep_runs(
    sweep_every: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `index_ttl_ms`, a label (or a repeated id) more than the TTL behind the newest
    transaction finds nothing, at the TTL it still joins: the same whether the sweep has run."""
    monkeypatch.setattr(engine_module, "EXPIRY_EVERY", sweep_every)
    ttl = 10 * 86_400_000
    engine = FeatureEngine(FeaturePipeline(FEATURES, LATENESS_MS), index_ttl_ms=ttl)
    engine.process(Transaction("a", T0, "c1", "m1", 10.0))
    engine.process(Transaction("b", T0 + 1, "c1", "m1", 10.0))
    engine.process(Transaction("c", T0 + ttl, "c2", "m1", 10.0))  # a is exactly the TTL behind
    assert isinstance(engine.process(Label("a", True, T0 + ttl)), LabelEvent)
    engine.process(Transaction("d", T0 + ttl + 2, "c2", "m1", 10.0))  # now b is past it
    late = engine.process(Label("b", True, T0 + ttl + 2))
    assert isinstance(late, DeadLetter) and late.reason == "unknown_txn"
    again = engine.process(Transaction("b", T0 + ttl + 3, "c3", "m1", 10.0))
    assert isinstance(again, FeatureVector)  # a new transaction, not a duplicate
    assert isinstance(engine.process(Label("b", False, T0 + ttl + 4)), LabelEvent)


def test_a_growing_key_leaves_the_small_object_allocator_at_16_events() -> None:
    """At PRESIZE_AT events the buffer is given room past pymalloc's 512 bytes in one step (see
    `presize`); values are unchanged and the snapshot stays exact-size."""
    engine = FeatureEngine(FeaturePipeline(SHORT, LATENESS_MS))
    sizes = []
    for i in range(buffer.PRESIZE_AT + 1):
        engine.process(Transaction(f"t{i}", T0 + i * 1000, "c1", "m1", 1.0 + i))
        state = engine.states[0]["card:c1"]
        sizes.append(sys.getsizeof(state) - sys.getsizeof(EntityState("i")))  # the buffer's allocation
    before, at = sizes[buffer.PRESIZE_AT - 2], sizes[buffer.PRESIZE_AT - 1]
    assert before <= buffer.SMALL_BLOCK < at
    plan = engine.pipeline.plans[0]
    assert plan.column(state, "amount") == [1.0 + i for i in range(buffer.PRESIZE_AT + 1)]
    assert len(pickle.dumps(state)) < 4 * plan.width * plan.count(state) + 200


def test_state_is_evicted_and_pickles_compactly() -> None:
    pipeline = FeaturePipeline(FEATURES, LATENESS_MS)
    engine = FeatureEngine(pipeline)
    for i in range(200):  # ~3 a day for 66 days: only the last 30 days (+ lateness) stay
        engine.process(
            Transaction(f"t{i}", T0 + i * 8 * 3_600_000, "c1", f"m{i % 7}", 10.0 + i, device_id="d1")
        )
    plan = pipeline.plans[0]
    state = engine.states[0]["card:c1"]
    times = plan.event_times(state)
    assert times == [T0 + i * 8 * 3_600_000 for i in range(200 - len(times), 200)]
    assert times[-1] - times[0] <= plan.retention_ms and plan.count(state) >= 89
    assert plan.column(state, "amount") == [10.0 + i for i in range(200 - len(times), 200)]
    assert state.wide is None  # whole cents: one 32-bit buffer, never widened
    clone = pickle.loads(pickle.dumps(state))
    assert pickle.dumps(clone) == pickle.dumps(state) and clone.tobytes() == state.tobytes()
    assert plan.event_times(clone) == times and plan.column(clone, "merchant_id") == plan.column(
        state, "merchant_id"
    )
    restored = plan.restore(state.snapshot())
    assert pickle.dumps(restored) == pickle.dumps(state)
    # 7 columns of 4 bytes plus the time: flat buffers, not Python objects per event
    assert len(pickle.dumps(state)) < 4 * plan.width * plan.count(state) + 200


def test_a_snapshot_of_another_format_is_refused_clearly() -> None:
    plan = FeaturePipeline(FEATURES, LATENESS_MS).plans[0]
    old_layout = (1_767_571_200_000, array("I", [0, 5]), (array("i", [100, 200]),), None)  # before state/2
    with pytest.raises(ValueError, match=r"unknown format.*fraud reset"):
        plan.restore(old_layout)


def test_a_snapshot_of_another_feature_set_is_refused_clearly() -> None:
    """A state written with other columns (or another time span) must not be read as this one's."""
    long_card = FeatureSet(windows=(WindowFeature(CARD, "sum", "amount", "90d"),))  # 64-bit times
    short_card = FeatureSet(windows=(WindowFeature(CARD, "count", window="1h"),))  # no amount column
    plan = FeaturePipeline(FEATURES, LATENESS_MS).plans[0]
    for other in (long_card, short_card):
        other_plan = FeaturePipeline(other, LATENESS_MS).plans[0]
        state = other_plan.new_state()
        for i in range(3):
            other_plan.observe(state, Transaction(f"t{i}", T0 + i * 1000, "c1", "m1", 5.0))
        with pytest.raises(ValueError, match=r"another feature set.*fraud reset"):
            plan.restore(state.snapshot())
    kernel_buffer = array("q", [0, 1, 2])  # 8-byte items for a 4-byte program
    if COMPILED is not None:
        with pytest.raises(ValueError, match="does not match"):
            COMPILED(kernel_buffer, 1, 0, 1, plan.kernel_program(), None)


def test_widened_key_keeps_its_values_and_survives_a_snapshot() -> None:
    """A non-cent amount moves the key to float64 for good, with earlier events converted exactly."""
    pipeline = FeaturePipeline(FEATURES, LATENESS_MS)
    plan = pipeline.plans[0]
    engine = FeatureEngine(pipeline)
    amounts = [10.0, 20.5, 1 / 3, 7.25]
    for i, a in enumerate(amounts):
        engine.process(Transaction(f"t{i}", T0 + i * 60_000, "c1", "m1", a, lat=41.3874, lon=2.1686))
    state = engine.states[0]["card:c1"]
    assert state.wide is not None and len(state) == 0
    assert plan.column(state, "amount") == amounts and plan.column(state, "lat") == [41.3874] * 4
    restored = pickle.loads(pickle.dumps(state))
    assert restored.wide is not None and plan.column(restored, "amount") == amounts
    assert plan.event_times(restored) == [T0 + i * 60_000 for i in range(4)]


def test_declarations_are_validated_with_clear_errors() -> None:
    with pytest.raises(SpecError, match="numeric"):
        WindowFeature(CARD, "sum", "merchant_id", "1h")
    with pytest.raises(SpecError, match="needs a window"):
        WindowFeature(CARD, "count")
    with pytest.raises(SpecError, match="bad duration"):
        duration_ms("1 week")
    with pytest.raises(SpecError, match="duplicate"):
        FeatureSet(windows=(WindowFeature(CARD, "count", window="1h"),) * 2)


def test_schema_hash_follows_the_declaration() -> None:
    other = FeatureSet(windows=(*FEATURES.windows, WindowFeature(CARD, "std", "amount", "7d")))
    assert other.schema_hash != FEATURES.schema_hash
    assert "amount_std_by_card_7d" in other.names
    assert FeatureSet(windows=FEATURES.windows, txn=FEATURES.txn).schema_hash == FEATURES.schema_hash
    assert FeatureSet(windows=FEATURES.windows).schema_hash != FEATURES.schema_hash  # other txn features


def test_stable_hash_is_not_salted() -> None:
    # A fixed value: a salted hash (Python's `hash`) would differ between processes and break restored state.
    assert stable_hash("m0007") == zlib.crc32(b"m0007") != 0
    assert stable_hash("m0007") != stable_hash("m0008")


def test_names_line_up_with_values_when_entities_are_interleaved() -> None:
    mixed = FeatureSet(
        windows=(
            WindowFeature(CARD, "count", window="1h"),
            WindowFeature(MERCHANT, "sum", "amount", "1h"),
            WindowFeature(CARD, "max", "amount", "1h"),
        )
    )
    engine = FeatureEngine(FeaturePipeline(mixed, LATENESS_MS))
    engine.process(Transaction("a", T0, "c1", "m1", 5.0))
    out = engine.process(Transaction("b", T0 + 1, "c1", "m2", 7.0))
    assert isinstance(out, FeatureVector)
    named = dict(zip(mixed.names, out.values, strict=True))
    assert named["count_by_card_1h"] == 2.0
    assert named["amount_max_by_card_1h"] == 7.0
    assert named["amount_sum_by_merchant_1h"] == 7.0


def test_a_key_is_kept_while_an_event_within_the_allowed_lateness_can_still_need_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event up to the allowed lateness behind the newest one is exact: it gets the features
    it would have got on time. So a card's history may only be dropped once its newest event is a
    look-back *and* the lateness behind: here the stream has moved a look-back plus half the
    lateness past the card's fraud, and a transaction of that card arriving exactly the lateness
    behind still counts that fraud in its delayed fraud rate."""
    import features.engine as engine_module

    monkeypatch.setattr(engine_module, "EXPIRY_EVERY", 1)  # sweep idle keys after every transaction
    pipeline = FeaturePipeline(FEATURES, LATENESS_MS)
    card = pipeline.plans[0]
    first = Transaction("a", T0, "c1", "m1", 10.0)
    fraud = Label("a", True, T0 + 3_600_000)
    now = T0 + card.lookback_ms + LATENESS_MS // 2  # where the stream is when the late one comes
    late = Transaction("b", now - LATENESS_MS, "c1", "m1", 20.0)  # exactly the lateness behind
    others = [Transaction(f"x{i}", now + i, "c2", "m2", 5.0) for i in range(2)]

    def vector_of_b(events: list[Transaction | Label]) -> list[float]:
        engine = FeatureEngine(pipeline)
        out = {e.txn_id: engine.process(e) for e in events}
        b = out["b"]
        assert isinstance(b, FeatureVector) and not b.late
        return b.values

    on_time = vector_of_b([first, fraud, late, *others])
    assert same(vector_of_b([first, fraud, *others, late]), on_time)
    rate = pipeline.names.index("fraud_rate_by_card_30d_delay_3d")
    assert on_time[rate] == 1.0  # the fraud is inside b's delayed window: the kept history counts


def test_idle_keys_expire_once_their_longest_window_has_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    import features.engine as engine_module

    monkeypatch.setattr(engine_module, "EXPIRY_EVERY", 1)
    pipeline = FeaturePipeline(FEATURES, LATENESS_MS)
    engine = FeatureEngine(pipeline)
    engine.process(Transaction("a", T0, "c-old", "m1", 10.0))
    card = pipeline.plans[0]
    look_back = card.lookback_ms  # the longest window plus its label delay
    engine.process(Transaction("b", T0 + 86_400_000, "c-new", "m1", 10.0))
    assert "card:c-old" in engine.states[0]  # one day later: still inside its look-back
    later = T0 + look_back + LATENESS_MS + 86_400_000
    engine.process(Transaction("c", later, "c-new", "m2", 10.0))
    engine.process(Transaction("d", later + 1, "c-new", "m2", 10.0))
    assert "card:c-old" not in engine.states[0] and "card:c-new" in engine.states[0]
    state = engine.states[0]["card:c-new"]
    assert not card.expired(state, later) and card.expired(state, later + 1 + card.retention_ms)


def test_weekend_and_night_flags_follow_utc_calendar() -> None:
    """2026-01-10 was a Saturday: 03:00 UTC is a weekend night; Monday 12:00 is neither."""
    saturday_3am = Transaction("a", 1_768_014_000_000, "c", "m", 1.0)
    monday_noon = Transaction("b", 1_768_219_200_000, "c", "m", 1.0)
    names = ("is_weekend", "is_night", "day_of_week", "hour_of_day")
    assert txn_features(saturday_3am, names) == [1.0, 1.0, 5.0, 3.0]
    assert txn_features(monday_noon, names) == [0.0, 0.0, 0.0, 12.0]


@given(
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=30),
    st.integers(-(2**32), 2**32),
)
def test_rebase_shifts_every_offset_and_clamps_to_the_span(offsets: list[int], minutes: int) -> None:
    """Moving a key's origin: each (sorted) time offset moves by the shift, clamped to the int32
    span; the other columns and the origin's minute as asked."""
    plan = FeaturePipeline(FeatureSet(windows=(WindowFeature(CARD, "count", window="1m"),)), 0).plans[0]
    xs, n = sorted(offsets), len(offsets)
    s = EntityState("i")
    s.extend([1_000_000, *xs, *range(n * (plan.width - 1))])
    new_base = 1_000_000 - minutes // 60_000
    plan._rebase(s, n, new_base)  # noqa: SLF001
    shift = minutes // 60_000 * 60_000
    assert list(s[1 : 1 + n]) == [min(2**31 - 1, max(-(2**31), x + shift)) for x in xs]
    assert s[0] == new_base and list(s[1 + n :]) == list(range(n * (plan.width - 1)))


def test_a_row_in_the_chain_carries_its_transaction_s_seq_across_processes() -> None:
    """The ordered steps sort the entity chain's rows by `seq`, which is their transaction's
    place in the canonical order: set when the row starts, and again when a row is unpickled in
    another process."""
    pipeline = FeaturePipeline(SHORT, LATENESS_MS)
    txn = Transaction(
        "t1", 1_700_000_000_000, "c1", "m1", 12.5, "EUR", "5411", "FR", "pos", seq=(7 << 64) + 3
    )
    row, _ = pipeline.start(txn)
    assert row.seq == txn.seq == (7 << 64) + 3
    row.parts.append([1.0, 2.0])
    row.late = True
    back = pickle.loads(pickle.dumps(row))
    assert back.seq == txn.seq and back == row and back.parts == [[1.0, 2.0]] and back.late
