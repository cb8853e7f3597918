"""The end-of-run summary: latency percentiles over every transaction, throughput by phase."""

from __future__ import annotations

import contextlib
import io
import math
import random
import re

import numpy as np
import pytest

from features.events import Transaction
from flows import outputs
from flows.outputs import LatencySketch, ProgressSink, throughput_by_tenth
from models.serving import Decision


def test_the_sketch_keeps_every_quantile_within_one_percent_and_merges() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(-3, 1.2) for _ in range(200_000)] + [0.0] * 10
    a, b = LatencySketch(), LatencySketch()
    for i, v in enumerate(values):
        (a if i % 2 else b).add(v)
    a.merge(b)
    assert a.n == len(values) and a.zeros == 10
    exact = np.quantile(np.asarray(values), [0.5, 0.9, 0.95, 0.99, 0.999])
    for q, want in zip((0.5, 0.9, 0.95, 0.99, 0.999), exact, strict=True):
        assert abs(a.quantile(q) - want) <= 0.01 * want, (q, a.quantile(q), want)
    assert len(a.counts) < 2_000  # bounded by the range of values, not their number
    assert a.quantile(0.0) == 0.0 and math.isnan(LatencySketch().quantile(0.5))


def test_throughput_by_tenth_interpolates_between_marks() -> None:
    # 1,000 decisions: the first 500 in 1 s, the next 500 in 4 s.
    marks = [(0.0, 0), (1.0, 500), (5.0, 1000)]
    assert throughput_by_tenth(marks) == pytest.approx([500.0] * 5 + [125.0] * 5)
    assert throughput_by_tenth([(0.0, 0), (1.0, 5)]) == []
    assert throughput_by_tenth([(0.0, 0), (1.0, 500)]) == []  # under 2 s of marks: too short to split
    assert throughput_by_tenth([(0.0, 0), (1.0, 5), (2.0, 9)]) == []  # 9 decisions: too few
    # A first second without a decision (dead letters only): the run starts at its first decision.
    assert throughput_by_tenth([(0.0, 0), (1.0, 0), (2.0, 500), (3.0, 1000)]) == pytest.approx([500.0] * 10)


def test_the_progress_lines_say_what_they_are_and_the_rates_count_each_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every `interval_s` a `[progress]` line; at the end the `[done]` lines, the throughput by
    tenth counting each decision once (a clock the test advances: 1,000 decisions a second)."""
    clock = [1_000.0]
    monkeypatch.setattr("flows.outputs.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    part = ProgressSink(5.0, out).build("progress", 0, 1)
    txn = Transaction("t", 1_767_600_000_000, "c", "m", 1.0)
    batch = [Decision(txn, [], 0.1, 0.0, 0.1, False, False, None) for _ in range(1_000)]
    for _ in range(20):
        clock[0] += 1.0
        part.write_batch(batch)
    part.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" ")[0] for line in lines if not line.startswith("[done]")] == ["[progress]"] * 4
    assert all(line.endswith(f"· {5.0 * (i + 1):.1f}s") for i, line in enumerate(lines[:4]))
    assert "[done] throughput by tenth of the transactions: " + " · ".join(["1,000"] * 10) + " /s" in lines


def test_the_summary_covers_every_transaction() -> None:
    out = io.StringIO()
    part = ProgressSink(3600, out).build("progress", 0, 1)
    txn = Transaction("t", 1_767_600_000_000, "c", "m", 1.0)
    batch = [Decision(txn, [], 0.1, 0.0, 0.1, False, False, None) for _ in range(10_000)]
    for b in range(120):  # 1,200,000 decisions, latencies 1 ms .. 1,200 s
        for i, d in enumerate(batch):
            d.latency_s = (b * 10_000 + i + 1) / 1000
        part.write_batch(batch)
    part.close()
    line = next(x for x in out.getvalue().splitlines() if "latency" in x)
    assert "every one of 1,200,000 transactions" in line  # not the first million only
    p99 = float(line.split("p99 ")[1].split(" ms")[0])
    assert abs(p99 - 1_188_000) <= 0.01 * 1_188_000, line  # the slow tail (seconds 1,000+) is in it


def test_the_progress_sink_prints_to_stdout_as_it_is_when_the_flow_runs() -> None:
    """Not the stdout of import time: a harness that redirects (and later closes) stdout gets
    the lines it is collecting."""
    sink = ProgressSink(60.0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        partition = sink.build("progress", 0, 1)
        partition.close()
    assert "[done]" in out.getvalue()


def test_the_last_lines_of_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 1 of 2 says so in every line; two latencies are enough for the latency line; the
    snapshot line lists the costliest step first; a run that ends at once has a rate of 0/s."""
    from flows.outputs import progress_line
    from service import telemetry

    assert "(0/s)" in progress_line(0.0, "[done]")
    monkeypatch.setattr(telemetry, "SNAPSHOT_SECONDS", {"index": [0.25], "card": [0.5], "idle": [0.0]})
    pauses = LatencySketch()
    for ms in (100, 200, 300, 400, 500, 600, 700, 800, 900, 1000):
        pauses.add(ms / 1000)
    monkeypatch.setattr(outputs, "EPOCH_PAUSES", pauses)
    out = io.StringIO()
    part = ProgressSink(3600, out).build("progress", 1, 2)
    txn = Transaction("t", 1_767_600_000_000, "c", "m", 1.0)
    batch = [Decision(txn, [], 0.1, 0.0, 0.1, False, False, None) for _ in range(2)]
    for d in batch:
        d.latency_s = 0.002
    part.write_batch(batch)
    part.close()
    lines = out.getvalue().splitlines()
    assert all(line.startswith("[done w1] ") for line in lines), lines
    assert any("arrival-to-decision latency: p50 2.0 ms" in line for line in lines), lines
    assert (
        lines[-2]
        == "[done w1] state snapshots at epoch closes: 0.75 s in this process (card 0.50 s, index 0.25 s)"
    )
    pause = re.fullmatch(
        r"\[done w1\] input paused at epoch closes: p50 ([\d.]+) ms · p90 ([\d.]+) ms · max ([\d.]+) ms "
        r"\(10 closes × Redis partitions\)",
        lines[-1],
    )
    assert pause is not None, lines[-1]
    p50, p90, top = (float(v) for v in pause.groups())
    assert (p50, p90, top) == pytest.approx((500, 900, 1000), rel=0.01)  # within the sketch's 1 %
    monkeypatch.setattr(outputs, "EPOCH_PAUSES", LatencySketch())  # no close measured: no line
    out = io.StringIO()
    part = ProgressSink(3600, out).build("progress", 0, 1)
    part.close()
    assert "input paused" not in out.getvalue()


def test_progress_lines_reach_a_pipe_as_they_are_printed() -> None:
    """A reader of the flow's output (`| tee`, a log shipper) sees each line when it is printed,
    not when a buffer fills or the flow ends."""
    import os
    import select

    r, w = os.pipe()
    with open(w, "w") as writer, open(r, "rb", buffering=0) as reader:
        part = ProgressSink(0.0, writer).build("progress", 0, 1)
        part.write_batch([])
        assert select.select([reader], [], [], 5.0)[0], "nothing reached the pipe"
        assert reader.read(4096).startswith(b"[progress] ")
