"""Throughput and memory of the feature engine, and its agreement with (and speed against) pandas.

    python -m benchmarks.features_bench --cards 20000 --days 30            # throughput + pandas check
    python -m benchmarks.features_bench --memory-only --cards 1000000      # state memory at 1M cards
    python -m benchmarks.features_bench ... --json                         # one JSON object instead

Synthetic data is drawn with numpy (not `fraud.datagen`, which is built for realism, not millions of
events): cards uniform, merchants Zipf-like (weight 1/rank^s), devices (each card has 1 or 2, about
40% of transactions carry one), lognormal amounts rounded to cents, Poisson arrivals at R per card
per day. Timestamps are made unique (ties nudged by 1 ms) so that pandas and the engine see the
same order for events of the same millisecond; generation and `Transaction` construction are
never timed. Everything runs on one core (the engine is single-threaded; BLAS/OpenMP pools are
pinned to one thread and the process to one CPU).

Memory is the deep size of the engine's objects: per entity, the state dict, its key strings and
every state object reachable from it (arrays counted with their buffers via `sys.getsizeof`), and
separately the engine's txn_id index (batch mode keeps every transaction id for duplicate
detection and label joins). `--tracemalloc` cross-checks with the allocations made by `features/`
code that are still alive (slower: do not read the throughput of such a run).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/pandas are imported

import argparse  # noqa: E402
import array  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from features.aggregations import kernel_name  # noqa: E402
from features.buffer import EntityState  # noqa: E402
from features.engine import FeatureEngine, FeaturePipeline  # noqa: E402
from features.events import Transaction  # noqa: E402
from features.spec import Entity, FeatureSet, WindowFeature, expand  # noqa: E402
from testkit.system import rss_bytes  # noqa: E402

DAY_MS = 86_400_000
START_MS = 1_767_571_200_000  # 2026-01-05T00:00:00Z
LATENESS_MS = 300_000

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
PANDAS_SUBSET = tuple(f for f in BENCH.windows if f.entity in (CARD, MERCHANT))


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


# ------------------------------------------------------------------------------------------- memory


def max_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not `ru_maxrss`: after fork and exec, `ru_maxrss` carries the
    parent's RSS at the fork (the restore check's child reported its 1.98 GiB parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_LEAVES = (str, bytes, int, float, complex, bool, type(None), array.array, range)


def deep_size(roots: Iterable[Any], seen: set[int]) -> int:
    """Bytes of every object reachable from `roots` not in `seen` (which it fills): containers,
    __slots__/__dict__/msgspec fields, array.array with its buffer, numpy arrays with theirs."""
    total = 0
    stack = list(roots)
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, EntityState):  # an array (its buffer counted) with slots to follow
            stack.extend(x for x in (o.wide, o.labels, o.prefix) if x is not None)
            continue
        if isinstance(o, _LEAVES):
            continue
        if isinstance(o, np.ndarray):  # getsizeof counts the buffer only when the array owns it
            if o.base is not None:
                stack.append(o.base)
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        else:
            names: list[str] = list(getattr(type(o), "__struct_fields__", ()))
            for klass in type(o).__mro__:
                slots = klass.__dict__.get("__slots__", ())
                names.extend([slots] if isinstance(slots, str) else slots)
            for name in names:
                if name not in ("__dict__", "__weakref__") and hasattr(o, name):
                    stack.append(getattr(o, name))
            if hasattr(o, "__dict__"):
                stack.append(o.__dict__)
    return total


def memory_report(engine: FeatureEngine, cards: int) -> dict[str, Any]:
    """Deep size of each entity's states and of the txn_id index."""
    seen: set[int] = set()
    seen.update(id(x) for x in (None, True, False))
    out: dict[str, Any] = {}
    card_keys = len(engine.states[0]) if engine.states else 0
    total_states = 0
    for plan, states in zip(engine.pipeline.plans, engine.states, strict=True):
        size = deep_size([states], seen)
        total_states += size
        lens = [plan.count(state) for state in states.values()]
        out[plan.entity.name] = {
            "keys": len(states),
            "bytes": size,
            "bytes_per_key": size / len(states) if states else None,
            "bytes_per_card": size / card_keys if card_keys else None,
            "events_in_state": sum(lens) if lens else None,
            "largest_key_events": max(lens) if lens else None,
        }
    index = deep_size([engine.index], seen)
    out["all_states"] = {
        "bytes": total_states,
        "bytes_per_card": total_states / card_keys if card_keys else None,
    }
    out["txn_index"] = {
        "entries": len(engine.index),
        "bytes": index,
        "bytes_per_entry": index / len(engine.index) if engine.index else None,
    }
    out["card_keys"] = card_keys
    out["cards_configured"] = cards
    return out


def traced_engine_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Live allocations made by code in features/ (the engine's states and index)."""
    where = str(ROOT / "features")
    stats = snapshot.filter_traces([tracemalloc.Filter(True, where + "/*")]).statistics("filename")
    return sum(s.size for s in stats)


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


def allocator_stats() -> dict[str, Any]:
    """glibc's view of its heap (`mallinfo2`, MiB) and pymalloc's (`sys._debugmallocstats`, which
    prints to stderr: its summary lines are captured from a pipe)."""
    import ctypes
    import re

    out: dict[str, Any] = {}
    try:
        fields = (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
        )

        class MallInfo2(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in (*fields, "keepcost")]

        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        mallinfo2.restype = MallInfo2
        info = mallinfo2()
        out["glibc"] = {"heap_bytes": info.arena, "in_use_bytes": info.uordblks, "free_bytes": info.fordblks}
    except (OSError, AttributeError):
        pass
    read, write = os.pipe()
    saved = os.dup(2)
    try:
        os.dup2(write, 2)
        os.close(write)
        sys._debugmallocstats()  # noqa: SLF001  (CPython's documented allocator dump)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    with os.fdopen(read) as f:
        text = f.read()

    def number(pattern: str) -> int:
        m = re.search(pattern + r"\s*=\s*([\d,]+)", text)
        return int(m.group(1).replace(",", "")) if m else -1

    out["pymalloc"] = {
        "arenas": number(r"# arenas allocated current"),
        "allocated_blocks_bytes": number(r"# bytes in allocated blocks"),
        "free_blocks_bytes": number(r"# bytes in available blocks"),
        "unused_pools_bytes": number(r"unused pools \* \d+ bytes"),
    }
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


# ------------------------------------------------------------------------------------------- pandas


def pandas_check(world: World, stream: Stream, txns: Sequence[Transaction], rows: int) -> dict[str, Any]:
    """The card and merchant features the way a notebook computes them, against the engine."""
    import pandas as pd

    rows = min(rows, len(stream))
    pipeline = FeaturePipeline(FeatureSet(windows=PANDAS_SUBSET, txn=()), LATENESS_MS)
    engine_s, engine_values = feed_collect(pipeline, txns[:rows])
    engine_matrix = np.array(engine_values, dtype=np.float64).reshape(rows, len(PANDAS_SUBSET))

    t0 = time.perf_counter()
    df = pd.DataFrame(
        {
            "ts": pd.to_datetime(stream.ts[:rows], unit="ms"),
            "card_id": [f"c{c}" for c in stream.card[:rows].tolist()],
            "merchant_id": [f"m{m}" for m in stream.merchant[:rows].tolist()],
            "amount": stream.amount[:rows],
        }
    )
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    columns: dict[str, np.ndarray] = {}
    for entity, key in ((CARD, "card_id"), (MERCHANT, "merchant_id")):
        feats = [f for f in PANDAS_SUBSET if f.entity == entity]
        groups = df.groupby(key, sort=False)
        for window in dict.fromkeys(f.window for f in feats if f.window):
            here = [f for f in feats if f.window == window]
            aggs = list(dict.fromkeys(f.agg for f in here))
            rolled = groups.rolling(pd.Timedelta(milliseconds=here[0].window_ms), on="ts", closed="right")
            result = rolled["amount"].agg(aggs)
            result = result.reset_index(level=0, drop=True).sort_index()  # back to row order
            for f in here:
                columns[f.name] = result[f.agg].to_numpy(dtype=np.float64)
        for f in feats:
            if f.agg == "time_since_last":
                lookback = max(g.window_ms for g in BENCH.for_entity(entity))
                gap_ms = groups["ts"].diff().dt.total_seconds().to_numpy() * 1000.0
                columns[f.name] = np.where(gap_ms < lookback, gap_ms / 1000.0, np.nan)
    pandas_s = time.perf_counter() - t0

    mismatches = []
    for j, f in enumerate(PANDAS_SUBSET):
        a, b = engine_matrix[:, j], columns[f.name]
        ok = np.isclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            mismatches.append(
                {"feature": f.name, "rows": int((~ok).sum()), "first_row": i, "engine": a[i], "pandas": b[i]}
            )
    return {
        "rows": rows,
        "features_compared": [f.name for f in PANDAS_SUBSET],
        "mismatching_features": mismatches,
        "engine_seconds": engine_s,
        "pandas_seconds": pandas_s,
        "pandas_dataframe_build_seconds": build_s,
        "engine_tx_per_s": rows / engine_s,
        "pandas_tx_per_s": rows / pandas_s,
        "engine_speedup_vs_pandas": pandas_s / engine_s,
    }


# --------------------------------------------------------------------------------------------- modes


def engine_fingerprint() -> dict[str, str]:
    """sha256 (12 hex) of the engine sources this run imported: figures name the code they measure."""
    import hashlib

    import features.aggregations
    import features.buffer
    import features.codegen
    import features.engine
    import features.plan

    modules = (features.buffer, features.aggregations, features.plan, features.engine, features.codegen)
    paths = [Path(m.__file__ or "") for m in modules]
    paths.append(paths[0].with_name("_kernel.c"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in paths}


def rss_after_malloc_trim() -> int | None:
    """RSS once glibc has returned its free heap pages to the system (`malloc_trim(0)`): how much
    of the RSS is memory the allocator holds but nothing uses. None where glibc is not the libc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return None
    trim(0)
    return rss_bytes()


def pin_one_cpu() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def throughput_mode(args: argparse.Namespace, report: dict[str, Any], log: Callable[[str], None]) -> None:
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    world = World(rng, args.cards, args.merchants, args.devices, args.zipf)
    stream = poisson_stream(world, args.days, args.tx_per_card_day)
    txns = world.transactions(stream)
    report["data"] = {
        "transactions": len(txns),
        "cards_with_events": len(np.unique(stream.card)),
        "merchants_with_events": len(np.unique(stream.merchant)),
        "devices_with_events": len(np.unique(stream.device[stream.device >= 0])),
        "share_with_device": float((stream.device >= 0).mean()),
        "top_merchant_share": float(world.merchant_share[0]),
        "generation_seconds": time.perf_counter() - t0,
    }
    log(f"generated {len(txns):,} transactions in {report['data']['generation_seconds']:.1f}s")
    pipeline = FeaturePipeline(BENCH, LATENESS_MS)
    gc.collect()
    rss_before = rss_bytes()

    warm = txns[: min(len(txns), args.warmup)]
    feed(pipeline, warm)
    runs = []
    engine: FeatureEngine | None = None
    for r in range(args.repeat):
        engine = None
        gc.collect()
        seconds, engine = feed(pipeline, txns, args.keep_index)
        runs.append(seconds)
        log(f"run {r + 1}/{args.repeat}: {len(txns) / seconds:,.0f} tx/s ({seconds:.1f}s)")
    assert engine is not None
    best = min(runs)
    report["throughput"] = {
        "transactions": len(txns),
        "warmup_transactions": len(warm),
        "runs_seconds": runs,
        "best_seconds": best,
        "tx_per_s": len(txns) / best,
        "us_per_tx": best / len(txns) * 1e6,
        "window_features_per_s": len(txns) * len(BENCH.windows) / best,
    }
    if args.breakdown:
        log("timing each entity alone")
        report["throughput"]["us_per_tx_by_part"] = entity_breakdown(pipeline, txns)
    gc.collect()
    rss_after = rss_bytes()
    report["rss"] = {
        "before_bytes": rss_before,
        "after_bytes": rss_after,
        "growth_bytes": rss_after - rss_before,
    }
    t0 = time.perf_counter()
    report["memory"] = memory_report(engine, args.cards)
    report["memory"]["measure_seconds"] = time.perf_counter() - t0
    del engine
    gc.collect()
    if args.pandas_rows > 0:
        log(f"pandas comparison on the first {min(args.pandas_rows, len(txns)):,} rows")
        report["pandas"] = pandas_check(world, stream, txns, args.pandas_rows)
    report["rss"]["max_bytes"] = max_rss_bytes()


def memory_mode(args: argparse.Namespace, report: dict[str, Any], log: Callable[[str], None]) -> None:
    """Each card gets exactly `events_per_card` events over 30 days: the k-th in the k-th of
    `events_per_card` equal slots, at a uniform offset; slots are generated and fed one by one."""
    rng = np.random.default_rng(args.seed)
    world = World(rng, args.cards, args.merchants, args.devices, args.zipf)
    per_card, span = args.events_per_card, 30 * DAY_MS
    slot = span // per_card
    pipeline = FeaturePipeline(BENCH, LATENESS_MS)
    gc.collect()
    rss_before = rss_bytes()
    if args.tracemalloc:
        tracemalloc.start()
    engine = FeatureEngine(pipeline, index_ttl_ms=None if args.keep_index else 0)
    process = engine.process
    engine_s = gen_s = 0.0
    fed = 0
    next_report = 0.1
    wall0 = time.perf_counter()
    for k in range(per_card):
        t0 = time.perf_counter()
        offsets = rng.integers(0, slot, args.cards)
        order = np.argsort(offsets, kind="stable")
        ts = START_MS + k * slot + offsets[order]
        events = world.events(ts, order)
        gen_s += time.perf_counter() - t0
        # Transaction objects are built a chunk at a time, as the flow's source hands them over
        # (FRAUD_SOURCE_BATCH_SIZE records per poll): objects that die together with the chunk
        # share allocator pools with keys created meanwhile, and a bigger chunk than the flow
        # ever holds would charge the pools it pins to the engine (50,000 added 20 MiB at 100k
        # cards; docs/features.md).
        for lo in range(0, args.cards, args.chunk):
            t0 = time.perf_counter()
            txns = world.transactions(events.slice(lo, lo + args.chunk), first_id=fed)
            gen_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            for t in txns:
                process(t)
            engine_s += time.perf_counter() - t0
            fed += len(txns)
            del txns
        if (k + 1) / per_card >= next_report - 1e-9 or k + 1 == per_card:
            log(
                f"[{(k + 1) / per_card:4.0%}] {fed:,} events, {fed / engine_s:,.0f} tx/s, "
                f"RSS {rss_bytes() / 2**30:.2f} GiB, {time.perf_counter() - wall0:.0f}s"
            )
            next_report += 0.1
    traced = None
    if args.tracemalloc:
        traced = traced_engine_bytes(tracemalloc.take_snapshot())
        tracemalloc.stop()
    gc.collect()
    rss_after = rss_bytes()
    if args.malloc_stats:
        report["allocators"] = allocator_stats()
    rss_trimmed = rss_after_malloc_trim()
    report["data"] = {
        "transactions": fed,
        "events_per_card": per_card,
        "span_days": 30,
        "top_merchant_share": float(world.merchant_share[0]),
        "generation_seconds": gen_s,
    }
    report["throughput"] = {
        "transactions": fed,
        "engine_seconds": engine_s,
        "tx_per_s": fed / engine_s,
        "wall_seconds": time.perf_counter() - wall0,
        "tracemalloc_on": bool(args.tracemalloc),
    }
    report["rss"] = {
        "before_bytes": rss_before,
        "after_bytes": rss_after,
        "growth_bytes": rss_after - rss_before,
        "growth_bytes_per_card": (rss_after - rss_before) / args.cards,
        "after_malloc_trim_bytes": rss_trimmed,
        "max_bytes": max_rss_bytes(),
        "txn_index_kept": bool(args.keep_index),
    }
    t0 = time.perf_counter()
    mem = memory_report(engine, args.cards)
    mem["measure_seconds"] = time.perf_counter() - t0
    if traced is not None:
        mem["tracemalloc_features_code_bytes"] = traced
    report["memory"] = mem
    if not args.no_restore:
        log("snapshotting every key and restoring them in a fresh process")
        report["restored"] = restore_check(engine)


def restore_check(engine: FeatureEngine) -> dict[str, Any]:
    """Pickle every key's state (what Bytewax recovery stores), then load them all in a fresh
    process: the memory of a worker that restarts holding this state, without the allocator's
    leftovers from building it one event at a time."""
    import pickle
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="fraud-states-", suffix=".pickle") as f:
        t0 = time.perf_counter()

        # One pickle per key (a Pickler's memo would keep every snapshot alive until the end).
        def dump(obj: object) -> None:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            f.write(len(data).to_bytes(4, "little") + data)

        for i, states in enumerate(engine.states):
            dump((i, len(states)))
            for item in states.items():
                dump(item)
        f.flush()
        dump_s = time.perf_counter() - t0
        size = os.path.getsize(f.name)
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.features_bench", "--restore-from", f.name, "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    if child.returncode:  # report it with the rest: an hour of measurements must not be lost to it
        return {"error": child.stderr.strip().splitlines()[-1:], "snapshot_bytes": size}
    out: dict[str, Any] = json.loads(child.stdout)
    out.update(snapshot_bytes=size, snapshot_seconds=dump_s)
    return out


def restore_mode(path: str) -> dict[str, Any]:
    """The child of `restore_check`: load the pickled states into dicts, as the engine holds them."""
    import pickle

    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    states: list[dict[str, EntityState]] = []
    with open(path, "rb") as f:

        def load() -> Any:
            return pickle.loads(f.read(int.from_bytes(f.read(4), "little")))

        while f.peek(1):
            _, n = load()
            d: dict[str, EntityState] = {}
            for _ in range(n):
                key, state = load()
                d[key] = state
            states.append(d)
    seconds = time.perf_counter() - t0
    gc.collect()
    after, peak = rss_bytes(), max_rss_bytes()  # before deep_size, whose id set is not the state's
    return {
        "keys": [len(d) for d in states],
        "states_bytes": deep_size(states, {id(x) for x in (None, True, False)}),
        "restore_seconds": seconds,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_growth_bytes": after - before,
        "max_rss_bytes": peak,
    }


# ------------------------------------------------------------------------------------------- output


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_block(r: dict[str, Any]) -> None:
    c, d, t, m, rss = r["config"], r["data"], r["throughput"], r["memory"], r["rss"]
    print(f"== feature engine benchmark ({'memory-only' if c['memory_only'] else 'throughput'}) ==")
    print(f"python {r['python']} · {r['kernel']} window reads · pinned to cpu {r['cpu']} · {r['features']['total']} features "
          f"({r['features']['window']} window features over {', '.join(r['features']['entities'])})")  # fmt: skip
    print(f"config: {json.dumps(c)}")
    print(f"engine sources (sha256): {json.dumps(r['engine_sources'])}")
    print(f"data: {d['transactions']:,} transactions; top merchant share {d['top_merchant_share']:.2%}; "
          f"generation {d['generation_seconds']:.1f}s (not timed)")  # fmt: skip
    if "tx_per_s" in t and "best_seconds" in t:
        print(f"throughput: {t['tx_per_s']:,.0f} tx/s ({t['us_per_tx']:.1f} µs/tx, best of "
              f"{len(t['runs_seconds'])}: {t['best_seconds']:.2f}s; {t['window_features_per_s']:,.0f} window features/s)")  # fmt: skip
    else:
        print(f"throughput: {t['tx_per_s']:,.0f} tx/s ({t['engine_seconds']:.1f}s in the engine, "
              f"{t['wall_seconds']:.1f}s wall{', tracemalloc on' if t['tracemalloc_on'] else ''})")  # fmt: skip
    if "us_per_tx_by_part" in t:
        parts = " · ".join(f"{k} {v:.2f}" for k, v in t["us_per_tx_by_part"].items())
        print(f"  each part alone, µs per transaction: {parts}")
    print(f"memory ({m['card_keys']:,} card keys):")
    for name in r["features"]["entities"]:
        e = m[name]
        print(f"  {name:<9} {e['keys']:>10,} keys  {_mib(e['bytes']):>13}  {e['bytes_per_key'] or 0:>9,.0f} B/key"
              f"  {e['bytes_per_card'] or 0:>9,.0f} B/card  largest key {e['largest_key_events']} events")  # fmt: skip
    print(
        f"  all states {_mib(m['all_states']['bytes']):>24}  {m['all_states']['bytes_per_card'] or 0:>21,.0f} B/card"
    )
    ix = m["txn_index"]
    if "entries" in ix:
        print(
            f"  txn index  {ix['entries']:>10,} ids   {_mib(ix['bytes']):>13}  {ix['bytes_per_entry'] or 0:>9,.0f} B/txn"
        )
    else:
        print(f"  txn index  dropped after each slot; measured {ix['bytes_per_entry']:,.0f} B/txn on "
              f"{ix['measured_on_entries']:,} ids = {ix['bytes_per_card_if_kept']:,.0f} B/card if kept")  # fmt: skip
    if "tracemalloc_features_code_bytes" in m:
        print(
            f"  tracemalloc: live allocations from features/ code {_mib(m['tracemalloc_features_code_bytes'])}"
        )
    print(f"RSS: before {_mib(rss['before_bytes'])}, after {_mib(rss['after_bytes'])} "
          f"(+{_mib(rss['growth_bytes'])}), peak {_mib(rss['max_bytes'])}")  # fmt: skip
    if rss.get("after_malloc_trim_bytes"):
        print(f"RSS after malloc_trim(0) (free heap pages returned): {_mib(rss['after_malloc_trim_bytes'])}")
    a = r.get("allocators")
    if a:
        g, pm = a.get("glibc"), a["pymalloc"]
        if g:
            print(
                f"glibc heap {_mib(g['heap_bytes'])}: in use {_mib(g['in_use_bytes'])}, free {_mib(g['free_bytes'])}"
            )
        print(f"pymalloc: {pm['arenas']} arenas; allocated blocks {_mib(pm['allocated_blocks_bytes'])}, free blocks "
              f"{_mib(pm['free_blocks_bytes'])}, unused pools {_mib(pm['unused_pools_bytes'])}")  # fmt: skip
    rs = r.get("restored")
    if rs and "error" in rs:
        print(f"restore check failed: {rs['error']}")
    elif rs:
        print(f"restored in a fresh process from the keys' pickled snapshots ({_mib(rs['snapshot_bytes'])}, "
              f"{rs['snapshot_bytes'] / m['card_keys']:,.0f} B/card; written in {rs['snapshot_seconds']:.1f}s, "
              f"loaded in {rs['restore_seconds']:.1f}s):")  # fmt: skip
        print(f"  states {_mib(rs['states_bytes'])}; RSS before {_mib(rs['rss_before_bytes'])}, after {_mib(rs['rss_after_bytes'])} "
              f"(+{_mib(rs['rss_growth_bytes'])}), peak {_mib(rs['max_rss_bytes'])}")  # fmt: skip
    p = r.get("pandas")
    if p:
        print(f"pandas ({p['rows']:,} rows, {len(p['features_compared'])} card+merchant features):")
        print(f"  engine {p['engine_seconds']:.2f}s ({p['engine_tx_per_s']:,.0f} tx/s) · pandas groupby-rolling "
              f"{p['pandas_seconds']:.2f}s ({p['pandas_tx_per_s']:,.0f} tx/s; DataFrame build "
              f"{p['pandas_dataframe_build_seconds']:.2f}s not counted) · engine/pandas speed {p['engine_speedup_vs_pandas']:.2f}x")  # fmt: skip
        if p["mismatching_features"]:
            for mm in p["mismatching_features"]:
                print(f"  MISMATCH {mm}")
        else:
            print("  all features equal (rtol=1e-9, atol=1e-9, NaN == NaN)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cards", type=int, default=20_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--tx-per-card-day", type=float, default=3.0)
    ap.add_argument("--merchants", type=int, default=None, help="merchant count (default: as many as cards)")
    ap.add_argument("--zipf", type=float, default=0.7, help="merchant popularity exponent (weight 1/rank^s)")
    ap.add_argument("--devices", type=int, default=None, help="device pool (default: as many as cards)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--warmup", type=int, default=20_000, help="transactions fed to a throw-away engine first"
    )
    ap.add_argument("--pandas-rows", type=int, default=200_000, help="0 skips the pandas comparison")
    ap.add_argument("--memory-only", action="store_true", help="fixed events per card over 30 days")
    ap.add_argument("--events-per-card", type=int, default=90)
    ap.add_argument(
        "--chunk",
        type=int,
        default=1_000,  # FRAUD_SOURCE_BATCH_SIZE's default (not imported: pydantic adds ~14 MiB of RSS)
        help="memory-only: transactions built per batch (default: the flow's source batch)",
    )
    ap.add_argument(
        "--keep-index",
        action="store_true",
        help="keep the engine's txn_id index (label joins, duplicate detection; one entry per "
        "transaction); features-only runs leave it off",
    )
    ap.add_argument("--tracemalloc", action="store_true", help="memory-only: cross-check with tracemalloc")
    ap.add_argument("--breakdown", action="store_true", help="throughput: also time each entity alone")
    ap.add_argument(
        "--malloc-stats", action="store_true", help="memory-only: glibc and pymalloc heap figures at the end"
    )
    ap.add_argument(
        "--no-restore", action="store_true", help="memory-only: skip the snapshot + fresh-process restore"
    )
    ap.add_argument("--restore-from", help=argparse.SUPPRESS)  # the child of the restore check
    ap.add_argument(
        "--python-kernel",
        action="store_true",
        help="window reads in Python even where features._kernel is built (the fallback's speed)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.restore_from:
        print(json.dumps(restore_mode(args.restore_from)))
        return 0
    if args.devices is None:
        args.devices = args.cards
    if args.merchants is None:
        args.merchants = args.cards
    if min(args.cards, args.days, args.merchants, args.devices, args.events_per_card, args.repeat) < 1:
        ap.error("counts must be >= 1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cpu = pin_one_cpu()
    if args.python_kernel:
        import features.aggregations

        features.aggregations.KERNEL = None  # plans read it when they are built, after this
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "kernel": kernel_name(),
        "cpu": cpu,
        "engine_sources": engine_fingerprint(),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "restore_from")},
        "features": {
            "total": len(BENCH.names),
            "window": len(BENCH.windows),
            "entities": [e.name for e in BENCH.entities],
        },
    }
    (memory_mode if args.memory_only else throughput_mode)(args, report, log)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    else:
        print_block(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
