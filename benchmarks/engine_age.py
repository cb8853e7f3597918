"""Does the feature engine slow down as its entity states age? (The long replay's last tenth.)

    python -m benchmarks.engine_age [--runs 2] [the world's options of benchmarks.long_replay]

`python -m benchmarks.long_replay --control` finds the last tenth of a six-month replay slower
than the same transactions replayed after only a warm-up, in every step, the card, merchant and
device steps too, whose entities are the same at both ends. This replays the same world through
the feature engine alone (`features.engine.FeatureEngine`, as `fraud train` runs it: no Bytewax,
no per-transaction tables; its index keeps a transaction one day past the label delay, so it
stays small), each replay in a process of its own, in turn:

- `whole`: the whole world, one engine from its first transaction;
- `control`: the control's files (the world from the warm-up before the last tenth on);
- `fresh`: the whole world, in one process, with a new engine from the control's first
  transaction on (an old process, young states).

Each prints the engine's µs per transaction over the last tenth (its `process` calls, labels
timed apart, less the engine's periodic sweeps: `FeatureEngine` drops expired keys every
`EXPIRY_EVERY` transactions inside a `process` call, and a tenth holds one sweep or two depending
on where it starts, a difference of ~5 % that says nothing about age; their time is printed),
and, in the first round, what the states hold at the tenth's start. `whole / control` above 1 is
what the aged process and states cost together; `fresh / control` is the process's part, so
whole / fresh is the states'. The world and the
control's files are long_replay's (generated once, cached under `.fraud/bench/`).
"""

from __future__ import annotations

import gc
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from benchmarks.common import DAY_MS, parser
from benchmarks.long_world import control_files, world, world_options
from features.engine import FeatureEngine
from features.event_files import replay
from features.events import Label
from service.runtime import new_pipeline, settle_heap
from service.settings import Settings


class TimedSweeps(FeatureEngine):
    """A feature engine that times its periodic sweeps (`_expire`) apart."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sweep_s, self.sweeps = 0.0, 0

    def _expire(self) -> None:
        started = time.perf_counter()
        super()._expire()
        self.sweep_s += time.perf_counter() - started
        self.sweeps += 1


def held(engine: FeatureEngine) -> str:
    """What the engine's entity states hold: keys, events, and keys with fraud labels, per entity."""
    return " · ".join(
        f"{plan.entity.name} {len(states):,} keys, {sum(map(plan.count, states.values())):,} events, "
        f"{sum(s.labels is not None for s in states.values()):,} with labels"
        for plan, states in zip(engine.pipeline.plans, engine.states, strict=True)
    )


def last_tenth(
    txns: str, labels: str, measure_from: int, fresh_from: int | None, index_ttl_ms: int
) -> tuple[float, float, int, int, float, str]:
    """Replay the files through a feature engine: µs per transaction and per label of its `process`
    calls from transaction `measure_from` (0-based, in file order) on, less its sweeps, how many
    transactions that was, how many sweeps and their ms in that span, and what the states held at
    its start (`held`). `fresh_from`: drop the engine and start a new one at that transaction."""
    pipeline = new_pipeline(Settings())
    engine: TimedSweeps | None = TimedSweeps(pipeline, index_ttl_ms)
    settle_heap()  # as the flow does before it runs
    clock = time.perf_counter
    tx_s = label_s = sweep_s = 0.0
    n = labelled = sweeps = 0
    at_start = ""
    for event in replay(Path(txns), Path(labels)):
        is_label = isinstance(event, Label)
        if not is_label and n == fresh_from:
            engine = None
            gc.collect()
            engine = TimedSweeps(pipeline, index_ttl_ms)
        assert engine is not None
        if not is_label and n == measure_from:
            at_start = held(engine)
        if n < measure_from:
            engine.process(event)
        else:
            swept, started = engine.sweep_s, clock()
            engine.process(event)
            took = clock() - started
            if engine.sweep_s != swept:  # this call swept: its sweep is counted apart
                sweeps, sweep_s = sweeps + 1, sweep_s + engine.sweep_s - swept
                took -= engine.sweep_s - swept
            if is_label:
                label_s, labelled = label_s + took, labelled + 1
            else:
                tx_s += took
        if not is_label:
            n += 1
    measured = n - measure_from
    return tx_s / measured * 1e6, label_s / max(labelled, 1) * 1e6, measured, sweeps, sweep_s * 1e3, at_start


def in_child(
    txns: str, labels: str, measure_from: int, fresh_from: int | None, index_ttl_ms: int
) -> tuple[float, float, int, int, float, str]:
    """`last_tenth` in a new process (each replay starts with a young heap)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(last_tenth, txns, labels, measure_from, fresh_from, index_ttl_ms).result()


def main() -> None:
    ap = parser(__doc__)
    world_options(ap)
    ap.add_argument("--runs", type=int, default=2, help="rounds of the three replays, in turn")
    args = ap.parse_args()
    txns, labels, warm, total = world(args)
    late_from = total - (total - warm) // 10
    c_txns, c_labels, c_warm = control_files(txns, labels, late_from, timedelta(days=args.warmup_days))
    begin = late_from - c_warm  # the control's first transaction, in the whole world
    ttl = round((args.label_delay_days + 1) * DAY_MS)
    print(
        f"last tenth: {total - late_from:,} transactions; whole world {total:,}, the control's "
        f"{c_warm + total - late_from:,} ({c_warm:,} of warm-up)"
    )
    runs: dict[str, list[float]] = {"whole": [], "control": [], "fresh": []}
    for r in range(args.runs):
        for name, files, measure_from, fresh_from in (
            ("whole", (txns, labels), late_from, None),
            ("control", (c_txns, c_labels), c_warm, None),
            ("fresh", (txns, labels), late_from, begin),
        ):
            tx_us, label_us, n, sweeps, sweep_ms, at_start = in_child(
                str(files[0]), str(files[1]), measure_from, fresh_from, ttl
            )
            runs[name].append(tx_us)
            print(
                f"run {r + 1} {name}: {tx_us:.2f} µs a transaction, {label_us:.2f} µs a label "
                f"({n:,} transactions; {sweeps} sweeps, {sweep_ms:.0f} ms, not counted)",
                flush=True,
            )
            if r == 0:
                print(f"  held at the tenth's start: {at_start}")
    med = {name: statistics.median(v) for name, v in runs.items()}
    ratios = [w / c for w, c in zip(runs["whole"], runs["control"], strict=True)]
    fresh = [f / c for f, c in zip(runs["fresh"], runs["control"], strict=True)]
    print(
        f"median µs a transaction: whole {med['whole']:.2f} · control {med['control']:.2f} · fresh "
        f"{med['fresh']:.2f}; whole / control by run {', '.join(f'{x:.2f}' for x in ratios)}; "
        f"fresh / control {', '.join(f'{x:.2f}' for x in fresh)}"
    )


if __name__ == "__main__":
    main()
