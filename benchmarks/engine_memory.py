"""Memory accounting of the feature engine: deep sizes, RSS, allocator statistics, the machine's
fingerprint, and a snapshot restored in a fresh process."""

from __future__ import annotations

import array
import gc
import json
import os
import sys
import time
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.common import ROOT
from features.buffer import EntityState
from features.engine import FeatureEngine
from testkit.system import max_rss_bytes, rss_bytes

if TYPE_CHECKING:
    pass


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
