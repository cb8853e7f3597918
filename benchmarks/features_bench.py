"""Throughput and memory of the feature engine, and its agreement with (and speed against) pandas.

    python -m benchmarks.features_bench --cards 20000 --days 30            # throughput + pandas check
    python -m benchmarks.features_bench --memory-only --cards 1000000      # state memory at 1M cards
    python -m benchmarks.features_bench ... --json                         # one JSON object instead

The data (benchmarks/engine_world.py: cards uniform, merchants Zipf-like, devices, lognormal amounts,
Poisson arrivals at R per card per day, unique timestamps) is generated and turned into
`Transaction`s untimed. Everything runs on one core (the engine is single-threaded; BLAS/OpenMP
pools are pinned to one thread and the process to one CPU).

Memory is the deep size of the engine's objects: per entity, the state dict, its key strings and
every state object reachable from it (arrays counted with their buffers via `sys.getsizeof`), and
separately the engine's txn_id index (batch mode keeps every transaction id for duplicate
detection and label joins). `--tracemalloc` cross-checks with the allocations made by `features/`
code that are still alive (slower: do not read the throughput of such a run). The pandas equality
itself is a test (tests/test_features_pandas.py); here it is checked again at the benchmark's size.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/pandas are imported

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import DAY_MS, LATENESS_MS, START_MS, log, parser  # noqa: E402
from benchmarks.engine_memory import (  # noqa: E402
    allocator_stats,
    engine_fingerprint,
    memory_report,
    pin_one_cpu,
    restore_check,
    restore_mode,
    rss_after_malloc_trim,
    traced_engine_bytes,
)
from benchmarks.engine_world import BENCH, World, entity_breakdown, feed, poisson_stream  # noqa: E402
from benchmarks.pandas_reference import pandas_check  # noqa: E402
from features.aggregations import kernel_name  # noqa: E402
from features.engine import FeatureEngine, FeaturePipeline  # noqa: E402
from testkit.system import max_rss_bytes, rss_bytes  # noqa: E402

# --------------------------------------------------------------------------------------------- modes


def throughput_mode(args: argparse.Namespace, report: dict[str, Any]) -> None:
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
        report["pandas"] = pandas_check(stream, txns, args.pandas_rows)
    report["rss"]["max_bytes"] = max_rss_bytes()


def memory_mode(args: argparse.Namespace, report: dict[str, Any]) -> None:
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
    ap = parser(__doc__)
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
    (memory_mode if args.memory_only else throughput_mode)(args, report)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    else:
        print_block(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
