"""What the benchmarks share: the feature engine benchmark's synthetic world and feature set, the
engine timed over it, memory accounting (deep sizes, RSS, allocators, a snapshot restored in a
fresh process), the pandas reference the engine is checked against (tests/test_features_pandas.py
runs it on a small world), and the command line every benchmark starts with.

Synthetic data is drawn with numpy (not `fraud.datagen`, which is built for realism, not millions of
events): cards uniform, merchants Zipf-like (weight 1/rank^s), devices (each card has 1 or 2, about
40% of transactions carry one), lognormal amounts rounded to cents, Poisson arrivals at R per card
per day. Timestamps are made unique (ties nudged by 1 ms) so that pandas and the engine see the
same order for events of the same millisecond.

Light on purpose (numpy and `features` only; pandas when the comparison runs): the memory figures
are of the process that imports it.
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import os
import sys
import time
import tracemalloc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from features.buffer import EntityState
from features.engine import FeatureEngine, FeaturePipeline
from features.events import Transaction
from features.spec import Entity, FeatureSet, WindowFeature, expand
from testkit.system import max_rss_bytes, rss_bytes

if TYPE_CHECKING:
    import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line, its module docstring as the help text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the figures, or the JSON object)."""
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ feature set

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


def pandas_frame(stream: Stream, rows: int) -> pd.DataFrame:
    """The first `rows` events as a notebook holds them: one row per transaction, ids as strings."""
    import pandas as pd

    return pd.DataFrame(
        {
            "ts": pd.to_datetime(stream.ts[:rows], unit="ms"),
            "card_id": [f"c{c}" for c in stream.card[:rows].tolist()],
            "merchant_id": [f"m{m}" for m in stream.merchant[:rows].tolist()],
            "amount": stream.amount[:rows],
        }
    )


def pandas_features(
    df: pd.DataFrame, features: Sequence[WindowFeature] = PANDAS_SUBSET, feature_set: FeatureSet = BENCH
) -> dict[str, np.ndarray]:
    """The card and merchant `features` the way a notebook computes them (groupby-rolling over event
    time, windows closed on the right), in row order; `time_since_last` looks back as far as the
    entity's longest window in `feature_set`."""
    import pandas as pd

    columns: dict[str, np.ndarray] = {}
    for entity, key in ((CARD, "card_id"), (MERCHANT, "merchant_id")):
        feats = [f for f in features if f.entity == entity]
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
                lookback = max(g.window_ms for g in feature_set.for_entity(entity))
                gap_ms = groups["ts"].diff().dt.total_seconds().to_numpy() * 1000.0
                columns[f.name] = np.where(gap_ms < lookback, gap_ms / 1000.0, np.nan)
    return columns


def engine_features(
    txns: Sequence[Transaction], features: Sequence[WindowFeature] = PANDAS_SUBSET
) -> tuple[float, np.ndarray]:
    """Seconds the engine takes over `txns` computing `features` alone, and its rows × features matrix."""
    pipeline = FeaturePipeline(FeatureSet(windows=tuple(features), txn=()), LATENESS_MS)
    seconds, values = feed_collect(pipeline, txns)
    return seconds, np.array(values, dtype=np.float64).reshape(len(txns), len(features))


def mismatches(
    engine: np.ndarray, reference: dict[str, np.ndarray], features: Sequence[WindowFeature] = PANDAS_SUBSET
) -> list[dict[str, Any]]:
    """The features whose engine column differs from the reference (rtol=1e-9, atol=1e-9, NaN == NaN)."""
    out = []
    for j, f in enumerate(features):
        a, b = engine[:, j], reference[f.name]
        ok = np.isclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            out.append(
                {"feature": f.name, "rows": int((~ok).sum()), "first_row": i, "engine": a[i], "pandas": b[i]}
            )
    return out


def pandas_check(stream: Stream, txns: Sequence[Transaction], rows: int) -> dict[str, Any]:
    """The card and merchant features the way a notebook computes them, against the engine: equal,
    and how fast each is."""
    rows = min(rows, len(stream))
    engine_s, engine_matrix = engine_features(txns[:rows])
    t0 = time.perf_counter()
    df = pandas_frame(stream, rows)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    columns = pandas_features(df)
    pandas_s = time.perf_counter() - t0
    return {
        "rows": rows,
        "features_compared": [f.name for f in PANDAS_SUBSET],
        "mismatching_features": mismatches(engine_matrix, columns),
        "engine_seconds": engine_s,
        "pandas_seconds": pandas_s,
        "pandas_dataframe_build_seconds": build_s,
        "engine_tx_per_s": rows / engine_s,
        "pandas_tx_per_s": rows / pandas_s,
        "engine_speedup_vs_pandas": pandas_s / engine_s,
    }


# ------------------------------------------------------------------------------------------ machine


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


# ------------------------------------------------------------------------------------------ restore


def restore_check(engine: FeatureEngine) -> dict[str, Any]:
    """Pickle every key's state (what Bytewax recovery stores), then load them all in a fresh
    process: the memory of a worker that restarts holding this state, without the allocator's
    leftovers from building it one event at a time. The child is `python -m benchmarks.features_bench
    --restore-from FILE --json`, which runs `restore_mode`."""
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
