"""The benchmarks that build flow steps themselves still run (a change to a step's signature
broke `benchmarks.index_memory` once, silently: benchmarks are not in the flow's import graph).

Tiny sizes: this checks that they run and print their figure, never what the figure is.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, timeout: int = 300) -> str:
    """Run `python -m benchmarks.<args>` in the repository; its stdout (fails with its output)."""
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    return out.stdout


@pytest.mark.parametrize("step", ["both", "index", "pending"])
def test_index_memory_benchmark_runs(step: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.index_memory",
            "--transactions",
            "3000",
            "--cards",
            "300",
            "--step",
            step,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(
        rf"^{step}: 3,000 transactions \(10\.0 per card\) held -> RSS .* bytes per transaction$",
        out.stdout,
        re.M,
    )
    assert re.search(r"^second half alone: -?[\d,]+ bytes per transaction", out.stdout, re.M)


def test_index_memory_measures_the_tables_alone() -> None:
    """`--tables-only`: the two tables without Bytewax, their RSS and own bytes per transaction
    (an index entry, a packed vector and their slots: more than the vector's ~120 bytes alone)."""
    out = bench("benchmarks.index_memory", "--tables-only", "--transactions", "20000", "--cards", "2000")
    m = re.search(
        r"^tables alone: 20,000 transactions in 16 index and 16 pending tables -> RSS \+[\d.,]+ MiB, "
        r"-?[\d,.]+ bytes per transaction \(the tables' nbytes: ([\d,.]+)\)$",
        out,
        re.M,
    )
    assert m, out
    assert 150 < float(m[1].replace(",", "")) < 400


def test_quality_benchmark_runs_and_prints_its_table() -> None:
    """The short version of `python -m benchmarks.quality` (the full one is in docs/benchmarks.md)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--worlds", "textbook", "late-pattern", "--cards", "700",
         "--merchants", "100", "--no-search", "--k", "20", "--seed", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for world in ("textbook", "late-pattern"):
        assert re.search(
            rf"^\| {world} \| (-?[\d.]+ \| ){{6}}[-+][\d.]+ \| [-+][\d.]+ \|$", out.stdout, re.M
        ), out.stdout
    assert re.search(
        r"^late-pattern, from the new pattern's first day .* with River AP [\d.]+", out.stdout, re.M
    )


@pytest.mark.parametrize(
    ("mode", "expect"),
    [
        ([], r"^  all features equal \(rtol=1e-9, atol=1e-9, NaN == NaN\)$"),
        (
            ["--memory-only", "--events-per-card", "5"],
            r"^restored in a fresh process from the keys' pickled snapshots",
        ),
    ],
)
def test_features_benchmark_runs(mode: list[str], expect: str) -> None:
    """Both modes of `python -m benchmarks.features_bench` (the memory mode with its restore child)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.features_bench", "--cards", "200", "--days", "3", "--warmup", "100", *mode],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(expect, out.stdout, re.M), out.stdout


@pytest.mark.skipif(not (ROOT.parent / "shared/peers/naive_flow.py").is_file(), reason="no peer flow here")
def test_cpu_ratio_benchmark_runs_a_pair() -> None:
    """With this checkout as its own baseline: the flow runs twice a pair, from either directory."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.cpu_ratio",
            "--pairs",
            "1",
            "--transactions",
            "500",
            "--baseline",
            ".",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert re.search(r"^pair 1: flow [\d.]+ CPU-s .* peer [\d.]+ CPU-s .* ratio [\d.]+$", out.stdout, re.M)
    assert re.search(
        r"^median CPU ratio flow / peer over 1 pair\(s\): [\d.]+ \(500 transactions", out.stdout, re.M
    )
    assert re.search(r"; baseline [\d.]+ CPU-s, ratio [\d.]+$", out.stdout, re.M)
    assert re.search(
        r"^baseline \.: median CPU ratio baseline / peer [\d.]+; flow / baseline [\d.]+ ", out.stdout, re.M
    )


def test_scale_projection_benchmark_prints_steps_and_projections() -> None:
    out = bench("benchmarks.scale_projection", "--transactions", "2000")
    assert re.search(r"^2,000 transactions, 2,000 decided, one process: [\d.]+ CPU-s", out, re.M)
    for step in ("index", "card", "merchant", "device", "pending", "score"):
        assert re.search(rf"^  {step} +[\d.]+ s +[\d.]+ %$", out, re.M), out
    for p in (4, 8, 16):
        assert re.search(rf"^P={p:>2}: +[\d.]+x one process .* largest per-process cost: ", out, re.M)


QUICK_REPLAY = ("--days", "30", "--cards", "500", "--seed", "5")  # the docstring's quick version


def test_long_replay_benchmark_prints_its_rates() -> None:
    """The short version of `python -m benchmarks.long_replay` (the full one is in docs/benchmarks.md)."""
    out = bench("benchmarks.long_replay", *QUICK_REPLAY)
    assert re.search(r"^first 10 %: [\d,]+ tx/s · last 10 %: [\d,]+ tx/s · last / first: [\d.]+$", out, re.M)
    assert re.search(
        r"^[\d,]+ transactions over 30 days measured, after [\d,]+ over 40 days of warm-up ", out, re.M
    )
    assert re.search(r"^tx/s by tenth of the run: +([\d,]+ ){9}[\d,]+$", out, re.M), out
    assert re.search(r"^warm-up included, tx/s by tenth of the whole run: ([\d,]+ ){10}\(last", out, re.M)
    assert re.search(r"^tx per CPU-second by tenth: +([\d,]+ ){9}[\d,]+$", out, re.M), out
    assert re.search(r"· shard tables copied for a snapshot still held: 0$", out, re.M), out
    assert re.search(
        r"^per CPU-second, last / first tenth: [\d.]+ · last / second: [\d.]+ · last / third: [\d.]+$",
        out,
        re.M,
    )


def test_long_replay_paired_mode_prints_both_tenths() -> None:
    """`--paired`: two replays taking turns, the first and the last tenth compared turn by turn."""
    out = bench("benchmarks.long_replay", *QUICK_REPLAY, "--paired", "--slice", "0.02")
    assert re.search(
        r"^[\d,]+ transactions measured after [\d,]+ of warm-up; .* \((\d+) turns of 0.02 s", out, re.M
    )
    assert re.search(r"^first 10 %: [\d,]+ tx/s · last 10 %: [\d,]+ tx/s · last / first: [\d.]+ ", out, re.M)
    assert re.search(r"^per CPU-second: first [\d,]+ · last [\d,]+ · last / first [\d.]+$", out, re.M)
    assert re.search(r"^last / first by turn: median [\d.]+, middle half [\d.]+-[\d.]+$", out, re.M)
    steps = re.search(r"^µs per transaction, first / last 10 % \(median by turn\): (.*)$", out, re.M)
    assert steps, out
    shown = dict(re.findall(r"(\w[\w ]*?) (-?[\d.]+ / -?[\d.]+)(?: · |$)", steps[1]))
    assert {"index", "card", "pending", "score", "the rest of the process", "CPU"} <= set(shown), steps[1]
    assert re.search(r" · of which garbage collection \(all turns\) [\d.]+ / [\d.]+$", steps[1]), steps[1]


def test_long_replay_control_mode_replays_the_last_tenth_after_only_a_warm_up() -> None:
    """`--control`: the last tenth against the same transactions replayed after only a warm-up
    (written once beside the world's files: its transactions from the warm-up before that tenth)."""
    out = bench("benchmarks.long_replay", *QUICK_REPLAY, "--control", "--slice", "0.02")
    found = re.search(
        r"; control: the last 10 % replayed after only its warm-up \(([\d,]+) transactions\)$", out, re.M
    )
    assert found, out
    measured = re.search(r"^([\d,]+) transactions measured after ([\d,]+) of warm-up", out, re.M)
    assert measured, out
    # the control's warm-up is as long in days as the run's: about as many transactions
    assert 0.8 < int(found[1].replace(",", "")) / int(measured[2].replace(",", "")) < 1.25, out
    assert re.search(r"^control: [\d,]+ tx/s · last 10 %: [\d,]+ tx/s · last / control: [\d.]+ ", out, re.M)
    assert re.search(r"^last / control by turn: median [\d.]+", out, re.M), out
    assert re.search(r"^µs per transaction, control / last 10 % \(median by turn\): .*index", out, re.M), out


def test_engine_age_replays_the_last_tenth_three_ways() -> None:
    """`benchmarks.engine_age`: the feature engine alone over long_replay's world, whole, from the
    control's files, and whole with a fresh engine at the control's start; each times the same
    last tenth (its transaction count in every replay)."""
    out = bench("benchmarks.engine_age", *QUICK_REPLAY, "--runs", "1")
    head = re.search(
        r"^last tenth: ([\d,]+) transactions; whole world ([\d,]+), the control's ([\d,]+)", out, re.M
    )
    assert head, out
    tenth, whole, control = (int(x.replace(",", "")) for x in head.groups())
    assert 0 < tenth < control < whole, out
    for name in ("whole", "control", "fresh"):
        run = re.search(
            rf"^run 1 {name}: [\d.]+ µs a transaction, [\d.]+ µs a label \(([\d,]+) transactions; "
            r"\d+ sweeps, \d+ ms, not counted\)$",
            out,
            re.M,
        )
        assert run and int(run[1].replace(",", "")) == tenth, out
    # what the states held at the tenth's start, once per replay: the same keys in each
    starts = re.findall(
        r"^  held at the tenth's start: card ([\d,]+) keys, ([\d,]+) events, ([\d,]+) with labels", out, re.M
    )
    assert len(starts) == 3 and all(int(k.replace(",", "")) > 0 for k, _, _ in starts), out
    assert re.search(
        r"^median µs a transaction: whole [\d.]+ · control [\d.]+ · fresh [\d.]+; whole / control", out, re.M
    )


def test_lifecycle_benchmark_runs() -> None:
    out = bench("benchmarks.lifecycle", "--repeats", "1", "--limit", "1500")
    assert re.search(r"^1,500 transactions, [\d,]+ labels learned", out, re.M), out
    for variant in ("champion alone", "+ shadow", "+ rules", "+ shadow + rules"):
        assert re.search(rf"^  {re.escape(variant)} +[\d.]+ CPU-s", out, re.M), out
    assert "live swap (cached)" in out and out.count("ms to apply a champion command") == 2


def test_train_memory_benchmark_runs() -> None:
    out = bench("benchmarks.train_memory", "--cards", "150", "--merchants", "60", "--days", "70")
    assert re.search(r"^fraud train --no-search: [\d,]+ transactions x \d+ features", out, re.M), out
    assert re.search(r"^peak RSS [\d,]+ MB; float32 matrix [\d,]+ MB; ratio [\d.]+;", out, re.M), out


def test_year_benchmark_runs_every_stage_and_logs_every_decision() -> None:
    """The short version of `python -m benchmarks.year` (the year itself is in docs/benchmarks.md)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.year", "--days", "60", "--cards", "200", "--merchants", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("generate", "train", "replay", "evaluate"):
        assert re.search(rf"^{stage} +\d+s +[\d,]+ MB  ", out.stdout, re.M), out.stdout
    logged = re.search(r"^replay .* ([\d,]+) decisions logged for ([\d,]+) transactions", out.stdout, re.M)
    assert logged and logged.group(1) == logged.group(2), out.stdout


def test_the_mutation_report_scores_each_module_without_its_equivalent_mutants(tmp_path: Path) -> None:
    from benchmarks.mutation import report

    (tmp_path / "models").mkdir()
    codes = {"m.x_f__mutmut_1": 1, "m.x_f__mutmut_2": 0, "m.x_f__mutmut_3": -24, "m.x_f__mutmut_4": 0,
             "m.x_f__mutmut_5": None, "m.x_f__mutmut_6": 33}  # fmt: skip
    (tmp_path / "models" / "m.py.meta").write_text(json.dumps({"exit_code_by_key": codes}))
    lines = report(tmp_path, {"m.x_f__mutmut_4": "chunk size"})
    row = lines[1].split()
    assert row[0] == "models/m.py" and row[1:7] == ["6", "1", "1", "2", "1", "1"]
    assert row[7] == "50.0%"  # (1 killed + 1 timeout) / (6 - 1 equivalent - 1 not run)
    assert lines[-2:] == ["  m.x_f__mutmut_2  (survived)", "  m.x_f__mutmut_6  (no tests)"]
    # Two clones that each ran part of the same code: each mutant's result is the one a clone has.
    other = tmp_path.parent / f"{tmp_path.name}-other"
    (other / "models").mkdir(parents=True)
    (other / "models" / "m.py.meta").write_text(
        json.dumps({"exit_code_by_key": {**dict.fromkeys(codes), "m.x_f__mutmut_5": 1, "m.x_f__mutmut_2": 1}})
    )
    table = report([tmp_path, other], {"m.x_f__mutmut_4": "chunk size"})
    assert table[2] == ""  # one module
    assert table[1].split()[1:8] == ["6", "3", "1", "1", "1", "0", "80.0%"]  # mutants 2 and 5 killed there
    # A kill stands whichever clone holds it: mutant 1, killed in the first, survived in a third.
    third = tmp_path.parent / f"{tmp_path.name}-third"
    (third / "models").mkdir(parents=True)
    (third / "models" / "m.py.meta").write_text(json.dumps({"exit_code_by_key": {"m.x_f__mutmut_1": 0}}))
    assert report([tmp_path, other, third], {"m.x_f__mutmut_4": "chunk size"})[1] == table[1]


def test_the_mutation_sample_draws_per_module_and_bounds_the_score(tmp_path: Path) -> None:
    from benchmarks.mutation import lower_bound, report, sample

    for module, count in (("a", 30), ("b", 3)):
        codes = {f"m{module}.x_f__mutmut_{i}": None for i in range(count)}
        (tmp_path / f"m{module}.py.meta").write_text(json.dumps({"exit_code_by_key": codes}))
    drawn = sample(tmp_path, 5, seed=7)
    assert len(drawn) == 5 + 3 and len(set(drawn)) == 8  # every mutant of a small module, no repeats
    assert sum(name.startswith("ma.") for name in drawn) == 5
    assert drawn == sample(tmp_path, 5, seed=7) and drawn != sample(tmp_path, 5, seed=8)
    # Wilson's lower bound: 50 of 50 killed says >= 92.9 %, 45 of 50 says >= 78.6 %.
    assert round(lower_bound(50, 50), 3) == 0.929 and round(lower_bound(45, 50), 3) == 0.786
    one_run = {f"ma.x_f__mutmut_{i}": (1 if i == 1 else None) for i in range(30)}
    (tmp_path / "ma.py.meta").write_text(json.dumps({"exit_code_by_key": one_run}))
    assert report(tmp_path, {})[1].split()[-2:] == ["100.0%", "20.7%"]  # one mutant of 30 run says little
    (tmp_path / "mb.py.meta").write_text(json.dumps({"exit_code_by_key": {"mb.x_f__mutmut_1": 1}}))
    assert report(tmp_path, {})[2].split()[-2:] == ["100.0%", "100.0%"]  # every mutant run: exact
    assert report(tmp_path, {"mb.x_f__mutmut_1": "a default"})[2].endswith("not run")  # only an equivalent


def test_scoring_batch_benchmark_prints_a_cost_per_batch_size() -> None:
    out = bench("benchmarks.scoring_batch", "--rows", "512", "--repeat", "2", "--sizes", "64,512")
    assert re.search(r"batch +64: +[\d.]+ µs/row \([\d.]+x batch 512\)", out), out
    assert re.search(r"batch +512: +[\d.]+ µs/row \(1\.00x batch 512\)", out), out


def test_same_decisions_finds_a_checkout_equal_to_itself_and_says_where_two_part() -> None:
    out = bench("benchmarks.same_decisions", "--baseline", str(ROOT), "--transactions", "600")
    assert re.search(r"decision: 600 and 600 entries, same", out), out
    for stream in ("alerts", "dlq", "late", "drift"):
        assert re.search(rf"{stream}: [\d,]+ and [\d,]+ entries, same", out), out
    from benchmarks.same_decisions import verdict

    assert verdict([{b"a": b"1"}], [{b"a": b"1"}]) == "same"
    assert verdict([{b"a": b"1"}, {b"a": b"2"}], [{b"a": b"1"}, {b"a": b"3"}]) == "DIFFERENT from entry 1"
    assert verdict([{b"a": b"1"}], [{b"a": b"1"}, {b"a": b"2"}]) == "DIFFERENT from entry 1"


def test_gc_pauses_benchmark_prints_start_up_with_and_without_the_pause() -> None:
    out = bench("benchmarks.gc_pauses", "--startup", "1")
    assert re.search(r"pair 1: paused [\d.]+ CPU-s \([\d.]+ s collecting\), collecting [\d.]+ CPU-s", out), (
        out
    )
    assert re.search(r"the pause saves -?[\d.]+ CPU-s", out), out


def test_gc_pauses_benchmark_prints_each_threshold() -> None:
    out = bench("benchmarks.gc_pauses", "--transactions", "1500", "--thresholds", "700,20000")
    for threshold in (700, 20000):
        assert re.search(rf"threshold +{threshold}: collections \d+/\d+/\d+ .* run [\d.]+ CPU-s", out), out


def test_redis_throughput_lets_set_override_its_settings_and_reads_the_summary_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--set` wins over the benchmark's own settings (FRAUD_RECOVERY_PARTITIONS once raised a
    TypeError), and the lines it reads are the ones a process's summary prints."""
    import io

    from benchmarks.redis_throughput import PAUSES, SNAPSHOTS, cluster_env
    from flows import outputs
    from service import telemetry

    env = cluster_env("redis://x", "t", 2, 1, tmp_path, 3.0, extra={"FRAUD_RECOVERY_PARTITIONS": "8"})
    assert env["FRAUD_RECOVERY_PARTITIONS"] == "8" and env["FRAUD_SOURCE_IDLE_EXIT_S"] == "3.0"
    assert cluster_env("redis://x", "t", 2, 3, tmp_path, 3.0)["FRAUD_RECOVERY_PARTITIONS"] == "3"
    pauses = outputs.LatencySketch()
    pauses.add(0.2)
    monkeypatch.setattr(outputs, "EPOCH_PAUSES", pauses)
    monkeypatch.setattr(telemetry, "SNAPSHOT_SECONDS", {"index": [0.25]})
    out = io.StringIO()
    outputs.ProgressSink(3600, out).build("progress", 0, 1).close()
    assert SNAPSHOTS.findall(out.getvalue()) == ["0.25 s in this process (index 0.25 s)"]
    (pause,) = PAUSES.findall(out.getvalue())
    p50 = re.match(r"p50 ([\d.]+) ms · p90 [\d.]+ ms · max [\d.]+ ms \(1 closes × Redis partitions\)$", pause)
    assert p50 is not None and float(p50.group(1)) == pytest.approx(200, rel=0.01), pause


def test_recovery_keys_benchmark_prints_a_close_per_key_count_and_mode() -> None:
    out = bench("benchmarks.recovery_keys", "--keys", "10", "2000", "--closes", "3")
    for keys in ("10", "2,000"):
        for mode in ("retain", "discard"):
            assert re.search(
                rf"keys saved +{keys} \( *{mode}\): epoch close +[\d.]+ ms median, +[\d.]+ ms max", out
            ), out
