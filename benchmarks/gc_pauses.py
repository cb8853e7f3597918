"""Time the flow spends in Python's garbage collector, by youngest-generation threshold.

    python -m benchmarks.gc_pauses [--thresholds 700,20000] [--transactions N]

For each threshold, one child process runs the flow as `python -m bytewax.run flows.fraud` builds
it (`flows.fraud.build`, then `service.runtime.settle_heap`; the threshold set after it, so 700 is
Python's default and what the flow did before `YOUNG_COLLECTION_AT`) on the bundled sample (its
first `--transactions` if given, with their labels; the outputs to a private Redis), in one
Bytewax worker (`bytewax.testing.run_main`). A `gc.callbacks` hook times every collection. Prints,
per threshold, the collections of each generation, the seconds they took, the longest one and
the process's CPU seconds for the run.

    python -m benchmarks.gc_pauses --startup 5

Start-up instead: `--startup` pairs of child processes, alternately, each importing the flow's
modules as `bytewax.run` does (`flows.fraud`, `service.runtime`) and collecting once as
`settle_heap` does: one as shipped (`flows.fraud` pauses the collector during its imports and
freezes what they created), one without (`gc.disable` and `gc.freeze` made no-ops before the
import). Prints each pair's
CPU seconds and time in the collector, and the median of each side.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, parser, time_collections


def child(threshold: int, txns: Path, labels: Path, url: str) -> None:
    """Run the flow in this process with `threshold`; print one result line."""
    from bytewax.testing import run_main

    from flows import fraud
    from service.runtime import settle_heap

    for k in [k for k in os.environ if k.startswith("FRAUD_")]:
        del os.environ[k]
    os.environ.update(
        FRAUD_TRANSACTIONS_PATH=str(txns), FRAUD_LABELS_PATH=str(labels), FRAUD_REDIS_URL=url,
        FRAUD_PROGRESS_INTERVAL_S="3600",
    )  # fmt: skip
    flow = fraud.build()
    settle_heap()
    gc.set_threshold(threshold, *gc.get_threshold()[1:])
    count, seconds, longest, started = [0, 0, 0], [0.0, 0.0, 0.0], [0.0], [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took, g = time.perf_counter() - started[0], info["generation"]
        count[g] += 1
        seconds[g] += took
        longest[0] = max(longest[0], took)

    gc.callbacks.append(timed)
    cpu = time.process_time()
    run_main(flow)
    cpu = time.process_time() - cpu
    gc.callbacks.remove(timed)
    print(
        f"threshold {threshold:>6}: collections {count[0]}/{count[1]}/{count[2]} (generations 0/1/2), "
        f"{sum(seconds):.3f} s in the collector ({seconds[0]:.3f}/{seconds[1]:.3f}/{seconds[2]:.3f}), "
        f"longest {longest[0] * 1000:.1f} ms; run {cpu:.2f} CPU-s"
    )


def startup_child(paused: bool) -> None:
    """Import the flow's modules and collect once; print CPU and collector seconds."""
    spent = [0.0]
    time_collections(spent)
    if not paused:  # what the pause calls, made no-ops
        gc.disable = gc.freeze = lambda: None
    cpu = time.process_time()
    import flows.fraud  # noqa: F401
    import service.runtime  # noqa: F401

    gc.collect()  # settle_heap's collection
    print(f"{time.process_time() - cpu:.3f} {spent[0]:.3f}")


def startup(pairs: int) -> None:
    import statistics

    sides: dict[str, list[tuple[float, float]]] = {"paused": [], "collecting": []}
    for pair in range(1, pairs + 1):
        order = ["paused", "collecting"] if pair % 2 else ["collecting", "paused"]
        for side in order:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.gc_pauses", "--startup-child", side],
                cwd=ROOT, capture_output=True, text=True, check=True,
            )  # fmt: skip
            cpu, collector = map(float, out.stdout.split())
            sides[side].append((cpu, collector))
        (pc, pg), (cc, cg) = sides["paused"][-1], sides["collecting"][-1]
        print(
            f"pair {pair}: paused {pc:.3f} CPU-s ({pg:.3f} s collecting), "
            f"collecting {cc:.3f} CPU-s ({cg:.3f} s collecting)"
        )
    med = {
        k: (statistics.median(c for c, _ in v), statistics.median(g for _, g in v)) for k, v in sides.items()
    }
    print(
        f"start-up, median of {pairs}: paused {med['paused'][0]:.3f} CPU-s ({med['paused'][1]:.3f} s collecting), "
        f"collecting {med['collecting'][0]:.3f} CPU-s ({med['collecting'][1]:.3f} s collecting); "
        f"the pause saves {med['collecting'][0] - med['paused'][0]:.3f} CPU-s"
    )


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--thresholds", default="700,20000")
    ap.add_argument("--transactions", type=int)
    ap.add_argument("--startup", type=int, metavar="PAIRS", help="time start-up instead, in PAIRS pairs")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--startup-child", choices=["paused", "collecting"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.startup_child:
        startup_child(args.startup_child == "paused")
        return
    if args.startup:
        startup(args.startup)
        return
    if args.child:
        threshold, txns, labels, url = args.child
        child(int(threshold), Path(txns), Path(labels), url)
        return
    from benchmarks.cpu_ratio import sample
    from testkit.private_redis import private_redis

    with tempfile.TemporaryDirectory() as tmp, private_redis() as url:
        txns, labels, n = sample(Path(tmp), args.transactions)
        print(f"{n:,} transactions with their labels, one worker")
        for threshold in args.thresholds.split(","):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.gc_pauses", "--child", threshold, str(txns), str(labels), url],
                cwd=ROOT, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if out.returncode:
                sys.exit(f"the run at threshold {threshold} failed:\n{out.stderr[-3000:]}")
            print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
