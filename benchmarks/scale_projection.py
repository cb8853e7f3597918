"""Where one process's CPU goes, step by step, and what that predicts for 4, 8 and 16 processes.

    python -m benchmarks.scale_projection [--transactions N]

Runs the flow (`flows.fraud.build`: the default features and model; then
`service.runtime.settle_heap`, as `python -m bytewax.run flows.fraud` does) in this process, one
worker, over the bundled sample (its first `--transactions` if given, with their labels), with
in-memory sinks, and reads what each step's logic cost from `fraud_step_seconds` (the seconds
`flows.ordering` accounts to each step) and what River's learning cost from
`fraud_online_learn_seconds`. Everything else the run cost (Bytewax's operators and exchanges,
decoding, the source, the stateless steps) is the remainder of the process's CPU time.

The projection: with P processes on P cores, every step's work is split P ways (keys and scorer
replicas spread over the workers) except River's learning, which every scorer replica repeats
for every label. So each process spends `learn + (run - learn) / P` CPU seconds on the stream,
and the cluster's rate is the single-process rate times `run / (learn + (run - learn) / P)`.
Start-up (imports, model load) is paid once per process and left out. The model does not count
what crossing processes costs (pickling items at each exchange, the network), so it is an upper
bound: `python -m benchmarks.redis_throughput --processes 1 2` measures the real thing where
there are cores for it.
"""

from __future__ import annotations

import resource
import tempfile
from pathlib import Path
from typing import Any

from bytewax.testing import TestingSink, run_main
from prometheus_client import REGISTRY

from benchmarks.common import parser
from benchmarks.cpu_ratio import sample
from flows.file_source import FileReplaySource
from flows.fraud import build
from service import telemetry
from service.runtime import settle_heap
from service.settings import Settings


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--transactions", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        txns, labels, n = sample(Path(tmp), args.transactions)
        settings = Settings(transactions_path=txns, labels_path=labels, progress_interval_s=3600)
        sinks: dict[str, list[Any]] = {k: [] for k in ("alerts", "dead", "decisions", "late")}
        flow = build(
            settings,
            source=FileReplaySource(txns, labels),
            alerts=TestingSink(sinks["alerts"]),
            dead_letters=TestingSink(sinks["dead"]),
            decisions=TestingSink(sinks["decisions"]),
            late=TestingSink(sinks["late"]),
            drift=TestingSink([]),
        )
        settle_heap()  # as `python -m bytewax.run flows.fraud` does before it runs the flow
        started = cpu_s()
        run_main(flow)
        run = cpu_s() - started
    learn = REGISTRY.get_sample_value("fraud_online_learn_seconds_total") or 0.0
    steps = {step: cell[0] for step, cell in telemetry.STEP_SECONDS.items() if cell[0] > 0}
    rest = run - sum(steps.values())
    print(
        f"{n:,} transactions, {len(sinks['decisions']):,} decided, one process: {run:.1f} CPU-s ({n / run:,.0f} tx per CPU-s)"
    )
    for step, secs in sorted(steps.items(), key=lambda kv: -kv[1]):
        print(f"  {step:<34} {secs:6.2f} s  {100 * secs / run:5.1f} %")
    print(f"  {'(Bytewax, decode, source, sinks)':<34} {rest:6.2f} s  {100 * rest / run:5.1f} %")
    print(f"  of which River learning (every replica, every label): {learn:.2f} s, {100 * learn / run:.1f} %")
    split = {**steps, "score": steps.get("score", 0.0) - learn, "(Bytewax, decode, source, sinks)": rest}
    for p in (1, 2, 4, 8, 16):
        per_process = learn + (run - learn) / p
        biggest = max(split, key=lambda k: split[k])
        limit = (
            "River learning (repeated in every process)"
            if learn > split[biggest] / p
            else f"{biggest} (split)"
        )
        print(
            f"P={p:>2}: {run / per_process:4.1f}x one process ({n / per_process:,.0f} tx per second of each "
            f"process's CPU); largest per-process cost: {limit}"
        )


if __name__ == "__main__":
    main()
