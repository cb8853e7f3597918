"""Does the flow keep its speed as its state grows? A long replay, its first and last 10 %.

    python -m benchmarks.long_replay [--days 180] [--cards 8500] [--label-delay-days 7] [--seed 3]

Generates (once; cached under `.fraud/bench/`) a world of `--days` days with `--cards` cards,
every transaction labelled `--label-delay-days` later (`fraud.datagen`: label policy "all", fixed
delay), and replays it through the flow in this process (`flows.fraud.build`, then
`service.runtime.settle_heap` as `python -m bytewax.run flows.fraud` does; one worker, the
default features and model, in-memory sinks) as fast as it goes. A fast replay keeps every
transaction waiting for its label (the label TTL is wall-clock time), so the flow's state grows
all run long: the index and the pending vectors hold every transaction, the entity steps every
card, merchant and device.

Prints the rate over the first and the last 10 % of the transactions decided (by the wall time
at which the decision count crossed 10 % and 90 %) and their ratio; the rate in every tenth of
the run, in transactions and in records (transactions + labels joined) per second; the same
tenths in transactions per CPU-second of the process (what each tenth cost the flow, whatever
else the machine was doing: on a shared machine the wall-clock rates drift with the neighbours);
the process's CPU, and its RSS at the end. The first tenth is a warm-up whatever the flow does: no label
arrives in the first `--label-delay-days` days, and the windows (up to 30 days) are still filling,
so each transaction costs less there; the second tenth is the fair baseline.
`--days 30 --cards 500` is a quick version.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSink, run_main
from prometheus_client import REGISTRY

from benchmarks.common import ROOT, log, parser
from flows.file_source import FileReplaySource
from flows.fraud import build
from fraud.datagen import GeneratorConfig, write_files
from service.runtime import settle_heap
from service.settings import Settings
from testkit.system import rss_bytes


def labels_joined() -> int:
    return int(
        sum(REGISTRY.get_sample_value("fraud_labels_total", {"is_fraud": v}) or 0 for v in ("true", "false"))
    )


Mark = tuple[int, float, float, int]  # decisions so far, wall clock, process CPU, labels joined


class _Clock(StatelessSinkPartition[Any]):
    def __init__(self, marks: list[Mark]) -> None:
        self.marks, self.n = marks, 0

    def write_batch(self, items: list[Any]) -> None:
        self.n += len(items)
        self.marks.append((self.n, time.monotonic(), time.process_time(), labels_joined()))


class ClockSink(DynamicSink[Any]):
    """Counts the decisions and notes when each batch of them arrived, the process's CPU time
    then, and the labels joined by then."""

    def __init__(self) -> None:
        self.marks: list[Mark] = []

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Clock:
        return _Clock(self.marks)


def crossing(marks: list[Mark], count: int) -> tuple[float, float, int]:
    """When (wall clock, process CPU) the decision count first reached `count`, and the labels
    joined by then."""
    return next((t, cpu, labels) for n, t, cpu, labels in marks if n >= count)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--days", type=int, default=180)
    ap.add_argument("--cards", type=int, default=8500)
    ap.add_argument("--label-delay-days", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    data = (
        ROOT / ".fraud" / "bench" / f"long-{args.days}d-{args.cards}c-{args.label_delay_days:g}l-{args.seed}"
    )
    txns, labels = data / "transactions.jsonl", data / "labels.jsonl"
    if not labels.is_file():
        log(f"generating {data} ...")
        config = GeneratorConfig(
            seed=args.seed,
            days=args.days,
            n_cards=args.cards,
            n_merchants=max(200, args.cards // 20),
            drift_day=None,
            label_delay="fixed",
            label_delay_days=args.label_delay_days,
        )
        write_files(data, config)
    settings = Settings(transactions_path=txns, labels_path=labels, progress_interval_s=60)
    clock = ClockSink()
    flow = build(
        settings,
        source=FileReplaySource(Path(txns), Path(labels)),
        alerts=TestingSink([]),
        dead_letters=TestingSink([]),
        decisions=clock,
        late=TestingSink([]),
        drift=TestingSink([]),
    )
    settle_heap()  # as `python -m bytewax.run flows.fraud` does before it runs the flow
    before = rss_bytes()
    started, cpu_started = time.monotonic(), time.process_time()
    run_main(flow)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    n = clock.marks[-1][0]
    cuts = [(started, cpu_started, 0)] + [crossing(clock.marks, n * k // 10) for k in range(1, 10)]
    cuts.append(clock.marks[-1][1:])
    spans = [cuts[k + 1][0] - cuts[k][0] for k in range(10)]
    cpu_spans = [cuts[k + 1][1] - cuts[k][1] for k in range(10)]
    if min(spans) <= 0 or min(cpu_spans) <= 0:
        raise SystemExit(
            "too short a run: two tenths of it were decided in one batch (more --days or --cards)"
        )
    tx = [(n * (k + 1) // 10 - n * k // 10) / spans[k] for k in range(10)]
    records = [(n * (k + 1) // 10 - n * k // 10 + cuts[k + 1][2] - cuts[k][2]) / spans[k] for k in range(10)]
    per_cpu = [(n * (k + 1) // 10 - n * k // 10) / cpu_spans[k] for k in range(10)]
    print(
        f"{n:,} transactions over {args.days} days ({args.cards:,} cards, every one labelled "
        f"{args.label_delay_days:g} days later), {clock.marks[-1][1] - started:,.0f} s"
    )
    print(
        f"first 10 %: {tx[0]:,.0f} tx/s · last 10 %: {tx[-1]:,.0f} tx/s · last / first: {tx[-1] / tx[0]:.2f}"
    )
    print("tx/s by tenth of the run:      " + " ".join(f"{r:,.0f}" for r in tx))
    print("records/s (transactions + labels): " + " ".join(f"{r:,.0f}" for r in records))
    print(
        f"last / second tenth (the windows full, labels flowing since day {args.label_delay_days:g}): "
        f"{tx[-1] / tx[1]:.2f} tx/s, {records[-1] / records[1]:.2f} records/s"
    )
    print("tx per CPU-second by tenth:     " + " ".join(f"{r:,.0f}" for r in per_cpu))
    print(
        f"per CPU-second, last / first tenth: {per_cpu[-1] / per_cpu[0]:.2f} · last / second: "
        f"{per_cpu[-1] / per_cpu[1]:.2f} · last / third: {per_cpu[-1] / per_cpu[2]:.2f}"
    )
    print(
        f"process CPU {usage.ru_utime + usage.ru_stime:,.0f} s · RSS at the end "
        f"+{(rss_bytes() - before) / 2**20:,.0f} MiB over the start"
    )


if __name__ == "__main__":
    main()
