"""Time the flow spends in Python's garbage collector, by youngest-generation threshold.

    python -m benchmarks.gc_pauses [--thresholds 700,20000] [--transactions N]

For each threshold, one child process runs the flow as `python -m bytewax.run flows.fraud` builds
it (`flows.fraud.build`, then `service.runtime.settle_heap`; the threshold set after it, so 700 is
Python's default and what the flow did before `YOUNG_COLLECTION_AT`) on the bundled sample (its
first `--transactions` if given, with their labels; the outputs to a private Redis), in one
Bytewax worker (`bytewax.testing.run_main`). A `gc.callbacks` hook times every collection. Prints,
per threshold, the collections of each generation, the seconds they took, the longest one and
the process's CPU seconds for the run.
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

from benchmarks.common import ROOT, parser


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


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--thresholds", default="700,20000")
    ap.add_argument("--transactions", type=int)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
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
