"""Does the flow keep its speed as its state grows? A long replay, the rate over its first and last 10 %.

    python -m benchmarks.long_replay [--days 180] [--cards 8500] [--label-delay-days 7] [--seed 3]
                                     [--warmup-days D] [--paired | --control] [--slice 2]

Generates (once; cached under `.fraud/bench/`) a world of `--warmup-days` + `--days` days with
`--cards` cards, every transaction labelled `--label-delay-days` later (`fraud.datagen`: label
policy "all", fixed delay), and replays it through the flow (`flows.fraud.build`, then
`service.runtime.settle_heap` as `python -m bytewax.run flows.fraud` does; one worker, the
default features and model, in-memory sinks) as fast as it goes. A fast replay keeps every
transaction waiting for its label (the label TTL is wall-clock time), so the flow's state grows
all run long: the index and the pending vectors hold every transaction, the entity steps every
card, merchant and device.

The measured run is the last `--days` days. The warm-up before it (by default the features'
longest look-back, 33 days, plus the label delay) is the only stretch whose work differs from the
rest by design: no label arrives in its first `--label-delay-days` days and the windows are still
filling, so each of its transactions costs less. It is replayed and its state kept (the measured
run starts holding it), but not counted.

One replay in this process prints, for the measured run: the rate over its first and last 10 %
of the transactions decided (by the wall time at which the decision count crossed each tenth)
and their ratio; the rate in every tenth, in transactions and in records (transactions + labels
joined) per second; the same tenths in transactions per CPU-second; the whole run's tenths,
warm-up included; the process's CPU, its RSS at the end, and how many times a shard copied its
table because the snapshot it lent was still held (`flows.shards`: none expected). On a shared
machine those tenths, minutes apart, drift with the neighbours.

`--paired` compares the two tenths under the same conditions instead: two replays of the world in
processes of their own, one run alone to the start of its last tenth, the other to the start of
its first (after the warm-up); then they take turns, `--slice` seconds each (the other paused,
SIGSTOP), until the early one has done its tenth. Prints each tenth's rate over its turns (per
wall-second and per CPU-second) and the median of the turn-by-turn ratios: a neighbour that slows
the machine for a while slows both sides alike; and where each tenth's time goes: each step's
logic (`fraud_step_seconds`) and the rest of the process, in µs per transaction (medians by
turn), and the garbage collector's pauses among them (their sum over the turns: the full
collections are rare and long).

`--control` takes the same turns against a control instead of the first tenth: the last tenth's
own transactions and labels, replayed after only a warm-up (the world from `--warmup-days`
before that tenth on; written once beside the world's files). Both replays then decide the same
transactions, one holding the whole run's state, the other a warm-up's: what the late tenth
loses to the state it holds (and the process's age), without the difference between two
stretches of the generated world.

`--days 30 --cards 500 --seed 5` is a quick version (with `--slice 0.02` in the paired modes).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import signal
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSink, run_main
from prometheus_client import REGISTRY

from benchmarks.common import log, parser, time_collections
from benchmarks.long_world import control_files, world, world_options
from flows.file_source import FileReplaySource
from flows.fraud import build
from flows.shards import ShardTable
from service.runtime import settle_heap
from service.settings import Settings
from service.telemetry import STEP_SECONDS
from testkit.system import rss_bytes


def labels_joined() -> int:
    return int(
        sum(REGISTRY.get_sample_value("fraud_labels_total", {"is_fraud": v}) or 0 for v in ("true", "false"))
    )


Mark = tuple[int, float, float, int]  # decisions so far, wall clock, process CPU, labels joined


STEPS = 32  # cells of a replay's shared per-step seconds (the flow has fewer timed steps)
GC = "garbage collection"  # timed beside the steps: the collector's pauses, whatever step they fall in
GC_SECONDS = [0.0]


class _Clock(StatelessSinkPartition[Any]):
    def __init__(self, marks: list[Mark], counter: Any, steps: Any) -> None:
        self.marks, self.counter, self.steps, self.n = marks, counter, steps, 0
        self.cells: list[list[float]] = []  # the steps' timers, in the order of `steps`

    def write_batch(self, items: list[Any]) -> None:
        self.n += len(items)
        self.marks.append((self.n, time.monotonic(), time.process_time(), labels_joined()))
        if self.steps is not None:  # before the count: a reader that sees the count sees these
            values, names = self.steps
            if not self.cells:  # the flow is built: its steps have their timers
                timed = sorted(STEP_SECONDS)[: STEPS - 1]
                names.value = "\n".join([*timed, GC]).encode()
                self.cells = [STEP_SECONDS[name] for name in timed] + [GC_SECONDS]
            for i, cell in enumerate(self.cells):
                values[i] = cell[0]
        if self.counter is not None:
            self.counter.value = self.n


class ClockSink(DynamicSink[Any]):
    """Counts the decisions and notes when each batch of them arrived, the process's CPU time
    then, and the labels joined by then (and publishes the count in `counter`, a shared value, and
    the seconds each step's logic has run in `steps`: shared arrays of the values and of the
    steps' names, newline-separated)."""

    def __init__(self, counter: Any = None, steps: Any = None) -> None:
        self.marks: list[Mark] = []
        self.counter, self.steps = counter, steps

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Clock:
        return _Clock(self.marks, self.counter, self.steps)


def replay(txns: Path, labels: Path, clock: ClockSink) -> float:
    """Replay the files through the flow in this process, as fast as it goes; when it started
    (after the flow was built and the heap settled)."""
    settings = Settings(transactions_path=txns, labels_path=labels, progress_interval_s=60)
    flow = build(
        settings,
        source=FileReplaySource(txns, labels),
        alerts=TestingSink([]),
        dead_letters=TestingSink([]),
        decisions=clock,
        late=TestingSink([]),
        drift=TestingSink([]),
    )
    settle_heap()  # as `python -m bytewax.run flows.fraud` does before it runs the flow
    started = time.monotonic()
    run_main(flow)
    return started


def crossing(marks: list[Mark], count: int) -> tuple[float, float, int]:
    """When (wall clock, process CPU) the decision count first reached `count`, and the labels
    joined by then."""
    return next((t, cpu, labels) for n, t, cpu, labels in marks if n >= count)


# -- the paired mode: the first and the last tenth, interleaved ------------------------------------


def _replay_child(txns: str, labels: str, counter: Any, steps: Any) -> None:
    """A replay in a process of its own, publishing its decision count in `counter` and its steps'
    seconds in `steps` (values, and their names once), and the garbage collector's."""
    time_collections(GC_SECONDS)
    replay(Path(txns), Path(labels), ClockSink(counter, steps))


Turn = tuple[int, float, float, list[float]]  # decisions, wall s, CPU s, each step's s


class Replay:
    """A replay in a child process, run and paused by signals, its decisions and CPU time read
    from outside."""

    def __init__(self, txns: Path, labels: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.counter = ctx.RawValue("q", 0)
        self.steps = ctx.RawArray("d", STEPS)
        self.names = ctx.RawArray("c", 64 * STEPS)
        self.proc = ctx.Process(
            target=_replay_child,
            args=(str(txns), str(labels), self.counter, (self.steps, self.names)),
            daemon=True,
        )
        self.proc.start()
        assert self.proc.pid is not None
        self.pid = self.proc.pid

    def decided(self) -> int:
        return int(self.counter.value)

    def cpu(self) -> float:
        """The process's CPU seconds so far (its threads'; /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _signal(self, sig: signal.Signals) -> None:
        # Only while it runs (is_alive reaps it once it ended: its pid may then be reused).
        if self.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def run_until(self, count: int, timeout_s: float = 3600.0) -> None:
        """Run (alone) until it has decided `count` transactions, then pause."""
        self.resume()
        deadline = time.monotonic() + timeout_s
        while self.decided() < count:
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise SystemExit(f"replay {self.pid} stopped at {self.decided():,} decisions of {count:,}")
            time.sleep(0.002)
        self.pause()

    def step_names(self) -> list[str]:
        """The timed steps of its flow (`fraud_step_seconds`), in the order of `step_seconds`."""
        return self.names.value.decode().split("\n") if self.names.value else []

    def step_seconds(self) -> list[float]:
        """The seconds each step's logic has run, as of its last batch of decisions."""
        return list(self.steps)

    def slice(self, seconds: float) -> Turn:
        """Run (alone) for `seconds`, then pause: decisions made, wall and CPU seconds taken, and
        each step's seconds (as of the last batch decided before and in the turn)."""
        n, cpu, t, steps = self.decided(), self.cpu(), time.monotonic(), self.step_seconds()
        self.resume()
        self.proc.join(seconds)
        if self.proc.is_alive():
            self.pause()
            wall = time.monotonic() - t
            spent = [b - a for a, b in zip(steps, self.step_seconds(), strict=True)]
            return self.decided() - n, wall, self.cpu() - cpu, spent
        return self.decided() - n, time.monotonic() - t, float("nan"), []  # ended (CPU unreadable)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(30)


def paired(
    txns: Path,
    labels: Path,
    warm: int,
    total: int,
    slice_s: float,
    control: tuple[Path, Path, int] | None = None,
) -> None:
    """The flow's rate over the first and the last tenth of the measured run, from two replays of
    the same world taking turns on the machine: one run to the start of its last tenth, one to the
    start of its first (after the warm-up), then `slice_s` each in turn until both tenths are done.

    `control` (files and their warm-up's transactions): the second replay is of those files, the
    world from the warm-up before the last tenth on, run to the start of that same tenth: the
    same transactions and labels against the state of a warm-up only."""
    tenth = (total - warm) // 10
    late_from = total - tenth
    if control is None:  # what the second replay decides in its turns, and what it is called
        early_txns, early_labels, early_from = txns, labels, warm
        first, short, ratio = "first 10 %", "first", "last / first"
    else:
        early_txns, early_labels, early_from = control
        first = short = "control"
        ratio = "last / control"
    early_to = early_from + tenth
    log(f"late replay: to decision {late_from:,} of {total:,} (alone) ...")
    late = Replay(txns, labels)
    try:
        late.run_until(late_from)
        log(f"{short} replay: through its warm-up, to decision {early_from:,} (alone) ...")
        early = Replay(early_txns, early_labels)
        try:
            early.run_until(early_from)
            log(f"taking turns, {slice_s:g} s each ...")
            pairs: list[tuple[Turn, Turn]] = []
            while late.proc.is_alive() and early.decided() < early_to:
                pairs.append((early.slice(slice_s), late.slice(slice_s)))
            names = early.step_names()
        finally:
            early.kill()
        late.resume()
        late.proc.join(600)
    finally:
        late.kill()
    # Whole pairs only: the last one may hold the late replay's end (its final flush, then exit),
    # or the control's, whose files end with the same tenth (an ended turn's CPU is NaN).
    done = [(e, lt) for e, lt in pairs if e[1] > 0 and lt[1] > 0 and e[2] == e[2] and lt[2] == lt[2]]
    if len(done) < 3:
        raise SystemExit("too few turns: more --days or --cards, or a shorter --slice")
    e_n, e_wall, e_cpu = sum(e[0] for e, _ in done), sum(e[1] for e, _ in done), sum(e[2] for e, _ in done)
    l_n, l_wall, l_cpu = sum(t[0] for _, t in done), sum(t[1] for _, t in done), sum(t[2] for _, t in done)
    ratios = sorted((lt[0] / lt[1]) / (e[0] / e[1]) for e, lt in done if e[0] > 0)
    print(
        f"{total - warm:,} transactions measured after {warm:,} of warm-up; two replays of the world "
        f"taking turns ({len(done)} turns of {slice_s:g} s each)"
        + (
            ""
            if control is None
            else f"; control: the last 10 % replayed after only its warm-up ({early_from:,} transactions)"
        )
    )
    print(
        f"{first}: {e_n / e_wall:,.0f} tx/s · last 10 %: {l_n / l_wall:,.0f} tx/s · {ratio}: "
        f"{(l_n / l_wall) / (e_n / e_wall):.2f} ({e_n:,} and {l_n:,} transactions decided in the turns)"
    )
    print(
        f"per CPU-second: {short} {e_n / e_cpu:,.0f} · last {l_n / l_cpu:,.0f} · {ratio} "
        f"{(l_n / l_cpu) / (e_n / e_cpu):.2f}"
    )
    print(
        f"{ratio} by turn: median {statistics.median(ratios):.2f}, middle half "
        f"{ratios[len(ratios) // 4]:.2f}-{ratios[(3 * len(ratios)) // 4]:.2f}"
    )

    # Each step's share, turn by turn: its logic's seconds (wall clock, `fraud_step_seconds`) per
    # transaction decided, the median over the turns. A pause that stops a replay inside a step
    # adds the whole pause to that step in the next turn (most turns have one such step, a
    # different one each time); a step's median leaves those turns out. The rest: the median CPU
    # per transaction less the steps' medians (Bytewax, the source, the sinks).
    def per_txn(turns: list[Turn], cell: Callable[[Turn], float]) -> float:
        return statistics.median(cell(t) / t[0] for t in turns if t[0] > 0) * 1e6

    def step(i: int) -> Callable[[Turn], float]:
        return lambda t: t[3][i]

    early_turns, late_turns = [e for e, _ in done], [lt for _, lt in done]
    rows = [(n, per_txn(early_turns, step(i)), per_txn(late_turns, step(i))) for i, n in enumerate(names)]
    rows = [r for r in rows if r[1] > 0 or r[2] > 0]
    rows = [r for r in rows if r[0] != GC]  # its time is inside the steps' and the rest's
    cpu = per_txn(early_turns, lambda t: t[2]), per_txn(late_turns, lambda t: t[2])
    rest = cpu[0] - sum(r[1] for r in rows), cpu[1] - sum(r[2] for r in rows)
    rows += [("the rest of the process", *rest), ("CPU", *cpu)]
    if GC in names:  # rare long pauses (the full collections): their sum over the turns, not a median
        i = names.index(GC)

        def collecting(ts: list[Turn]) -> float:
            return sum(t[3][i] for t in ts) / sum(t[0] for t in ts) * 1e6

        rows += [(f"of which {GC} (all turns)", collecting(early_turns), collecting(late_turns))]
    print(
        f"µs per transaction, {short} / last 10 % (median by turn): "
        + " · ".join(f"{n} {a:.1f} / {b:.1f}" for n, a, b in rows)
    )


# -- the run ---------------------------------------------------------------------------------------


def tenths(
    marks: list[Mark], first: int, last: int, start: tuple[float, float, int]
) -> tuple[list[float], list[float], list[float]]:
    """Transactions/s, records/s and transactions per CPU-second in each tenth of decisions
    `first`..`last` (`start`: wall clock, CPU and labels when decision `first` was made)."""
    n = last - first
    cuts = [start] + [crossing(marks, first + n * k // 10) for k in range(1, 10)]
    cuts.append(next((t, cpu, labels) for m, t, cpu, labels in marks if m >= last))
    spans = [cuts[k + 1][0] - cuts[k][0] for k in range(10)]
    cpu_spans = [cuts[k + 1][1] - cuts[k][1] for k in range(10)]
    if min(spans) <= 0 or min(cpu_spans) <= 0:
        raise SystemExit(
            "too short a run: two tenths of it were decided in one batch (more --days or --cards)"
        )
    sizes = [n * (k + 1) // 10 - n * k // 10 for k in range(10)]
    tx = [sizes[k] / spans[k] for k in range(10)]
    records = [(sizes[k] + cuts[k + 1][2] - cuts[k][2]) / spans[k] for k in range(10)]
    per_cpu = [sizes[k] / cpu_spans[k] for k in range(10)]
    return tx, records, per_cpu


def _row(values: list[float]) -> str:
    return " ".join(f"{v:,.0f}" for v in values)


def main() -> None:
    ap = parser(__doc__)
    world_options(ap)
    ap.add_argument(
        "--paired",
        action="store_true",
        help="compare the first and the last tenth in two replays taking turns on the machine",
    )
    ap.add_argument(
        "--control",
        action="store_true",
        help="paired, against the last tenth replayed after only a warm-up (the same transactions, "
        "little state) instead of the first tenth",
    )
    ap.add_argument("--slice", type=float, default=2.0, help="--paired, --control: seconds per turn")
    args = ap.parse_args()
    txns, labels, warm, total = world(args)
    if args.paired or args.control:
        control = None
        if args.control:
            late_from = total - (total - warm) // 10
            control = control_files(txns, labels, late_from, timedelta(days=args.warmup_days))
        paired(txns, labels, warm, total, args.slice, control)
        return

    clock = ClockSink()
    before = rss_bytes()
    cpu_started = time.process_time()
    started = replay(txns, labels, clock)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    n = clock.marks[-1][0]
    if n != total:
        raise SystemExit(f"{n:,} decisions for {total:,} transactions")
    tx, records, per_cpu = tenths(clock.marks, warm, n, crossing(clock.marks, warm))
    whole, _, _ = tenths(clock.marks, 0, n, (started, cpu_started, 0))
    print(
        f"{n - warm:,} transactions over {args.days} days measured, after {warm:,} over "
        f"{args.warmup_days} days of warm-up ({args.cards:,} cards, every one labelled "
        f"{args.label_delay_days:g} days later), {clock.marks[-1][1] - started:,.0f} s in all"
    )
    print(
        f"first 10 %: {tx[0]:,.0f} tx/s · last 10 %: {tx[-1]:,.0f} tx/s · last / first: {tx[-1] / tx[0]:.2f}"
    )
    print("tx/s by tenth of the run:      " + _row(tx))
    print(
        "records/s (transactions + labels): "
        + _row(records)
        + f" (last / first {records[-1] / records[0]:.2f})"
    )
    print("tx per CPU-second by tenth:     " + _row(per_cpu))
    print(
        f"per CPU-second, last / first tenth: {per_cpu[-1] / per_cpu[0]:.2f} · last / second: "
        f"{per_cpu[-1] / per_cpu[1]:.2f} · last / third: {per_cpu[-1] / per_cpu[2]:.2f}"
    )
    print(
        "warm-up included, tx/s by tenth of the whole run: "
        + _row(whole)
        + f" (last / first {whole[-1] / whole[0]:.2f})"
    )
    print(
        f"process CPU {usage.ru_utime + usage.ru_stime:,.0f} s · RSS at the end "
        f"+{(rss_bytes() - before) / 2**20:,.0f} MiB over the start · shard tables copied for a "
        f"snapshot still held: {ShardTable.copies}"
    )


if __name__ == "__main__":
    main()
