"""Drift watch (`models.drift`): PSI against the training reference, prequential quality, ADWIN on
missed frauds, and the events they raise; pure Python, no Redis."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from models.drift import (
    HOUR_MS,
    ConceptDrift,
    DataDrift,
    DriftMonitor,
    Reference,
    change_point,
    psi,
    reference_of,
)

NAMES = ["a", "b"]


def world(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Feature `a` normal (shifted by `shift`), `b` uniform with 10 % missing; scores uniform."""
    X = np.column_stack([rng.normal(shift, 1, n), rng.uniform(0, 1, n)])
    X[rng.random(n) < 0.1, 1] = np.nan
    return X, rng.uniform(0, 1, n)


def test_reference_bins_missing_values_apart_and_round_trips_through_json() -> None:
    rng = np.random.default_rng(1)
    X, s = world(rng, 10_000)
    ref = reference_of(X, NAMES, s)
    assert ref.names == ("a", "b", "score")
    assert [len(e) for e in ref.edges] == [9, 9, 9]  # deciles
    np.testing.assert_allclose(ref.expected.sum(axis=1), 1.0)
    assert ref.expected[0, 0] == 0 and ref.expected[1, 0] == pytest.approx(0.1, abs=0.01)  # missing bin
    assert ref.expected[0, 1:].max() == pytest.approx(0.1, abs=0.01)
    B = ref.bins(np.array([[np.nan, np.inf, -1e9]]))
    assert B.tolist() == [[0, 0, 1]]
    M = np.column_stack([X, s])[:500]
    M[::7, 0] = ref.edges[0][3]  # on an edge: counted in the bin above it, as searchsorted "right"
    want = np.column_stack([np.searchsorted(e, M[:, c], side="right") + 1 for c, e in enumerate(ref.edges)])
    want[~np.isfinite(M)] = 0
    np.testing.assert_array_equal(ref.bins(M), want)
    again = Reference.from_json(ref.to_json())
    assert again.names == ref.names
    np.testing.assert_allclose(again.expected, ref.expected, atol=1e-8)
    with pytest.raises(ValueError, match="bad edges"):
        Reference.from_json({**ref.to_json(), "edges": [[2.0, 1.0], [], []]})


def test_psi_is_zero_on_the_reference_and_large_on_a_shift() -> None:
    rng = np.random.default_rng(2)
    X, s = world(rng, 20_000)
    ref = reference_of(X, NAMES, s)
    used = ref.expected > -1
    same = psi(ref.expected * 1000, ref.expected, used)
    assert np.allclose(same, 0)
    X2, s2 = world(rng, 5000, shift=1.0)
    M = np.column_stack([X2, s2])
    from models.drift import _counts

    got = psi(_counts(ref.bins(M), ref.width), ref.expected, used)
    assert got[0] > 0.5 and got[1] < 0.05 and got[2] < 0.05


def feed(dd: DataDrift, rng: np.random.Generator, hours: range, shift: float, per_hour: int = 200) -> list:
    events = []
    for h in hours:
        X, s = world(rng, per_hour, shift)
        ts = h * HOUR_MS + rng.integers(0, HOUR_MS, per_hour)
        events += dd.observe(ts, X, s)
    return events


def test_data_drift_flags_the_shifted_feature_once_and_its_recovery() -> None:
    rng = np.random.default_rng(3)
    X, s = world(rng, 20_000)
    dd = DataDrift(reference_of(X, NAMES, s), window_hours=24, threshold=0.25, min_rows=500)
    assert feed(dd, rng, range(1000, 1000 + 72), 0.0) == []  # stable: nothing
    assert np.nanmax(dd.last_psi) < 0.05
    shifted = feed(dd, rng, range(1072, 1072 + 48), 1.5)
    assert [(e.kind, e.what, e.state) for e in shifted] == [("data", "a", "drifting")]
    e = shifted[0]
    assert e.value > 0.25 and e.threshold == 0.25 and e.since_ms == e.at_ms - 24 * HOUR_MS
    assert 1072 * HOUR_MS < e.at_ms <= (1072 + 24) * HOUR_MS
    back = feed(dd, rng, range(1120, 1120 + 48), 0.0)
    assert [(e.what, e.state) for e in back] == [("a", "recovered")]
    assert back[0].since_ms == e.since_ms
    assert e.id != back[0].id and e.id == f"data:a:drifting:{e.at_ms}"


def test_data_drift_judges_no_window_before_it_is_full_nor_with_too_few_rows() -> None:
    rng = np.random.default_rng(4)
    X, s = world(rng, 10_000)
    dd = DataDrift(reference_of(X, NAMES, s), window_hours=24, threshold=0.25, min_rows=500)
    assert feed(dd, rng, range(0, 24), 3.0) == []  # shifted from the start, but the window is not full
    assert [e.what for e in feed(dd, rng, range(24, 26), 3.0)] == ["a"]
    sparse = DataDrift(reference_of(X, NAMES, s), window_hours=24, threshold=0.25, min_rows=500)
    assert feed(sparse, rng, range(0, 60), 3.0, per_hour=10) == []  # 240 rows a window: never judged


def test_data_drift_state_survives_pickling() -> None:
    """The scorer's snapshot pickles its drift watch: a restored copy finds what the original does."""
    rng = np.random.default_rng(5)
    X, s = world(rng, 10_000)
    a = DataDrift(reference_of(X, NAMES, s), window_hours=24)
    feed(a, rng, range(0, 30), 0.0)
    b = pickle.loads(pickle.dumps(a))
    ea, eb = (feed(d, np.random.default_rng(9), range(30, 60), 2.0) for d in (a, b))
    assert ea == eb and ea


def labels(cd: ConceptDrift, n: int, miss_rate: float, start_ms: int, rng: np.random.Generator) -> list:
    """`n` fraud labels a minute apart, each missed (scored 0.1, under the 0.5 threshold) with
    probability `miss_rate`, caught (0.9) otherwise; each followed by 9 genuine labels (0.05)."""
    events = []
    for i in range(n):
        t = start_ms + i * 60_000
        s = 0.1 if rng.random() < miss_rate else 0.9
        events += cd.observe(True, s, s, s, t)
        for _ in range(9):
            events += cd.observe(False, 0.05, 0.05, 0.05, t)
    return events


def test_concept_drift_flags_a_jump_in_missed_frauds_and_dates_it() -> None:
    rng = np.random.default_rng(6)
    cd = ConceptDrift(0.5, window=2000, every=100)
    assert labels(cd, 600, 0.2, 0, rng) == []
    change = 600 * 60_000
    events = labels(cd, 400, 0.8, change, rng)
    drifting = [e for e in events if e.state == "drifting"]
    assert {e.what for e in drifting} == {"xgboost", "final"}
    for e in drifting:
        assert e.kind == "concept" and e.value > e.threshold
        assert abs(e.since_ms - change) < 30 * 60_000  # dated to within 30 labels of the change
        assert change < e.at_ms < change + 200 * 60_000
    # Prequential quality over the window: every fraud scored 0.1 or 0.9, every genuine 0.05.
    q = cd.metrics["final"]
    assert q["auc"] > 0.5 and 0 < q["recall"] < 1 and q["precision"] == 1.0
    assert set(cd.metrics) == {"xgboost", "river", "final"}


def test_concept_drift_stays_quiet_on_a_steady_stream() -> None:
    rng = np.random.default_rng(7)
    cd = ConceptDrift(0.5, window=2000, every=100)
    assert [e for e in labels(cd, 3000, 0.3, 0, rng) if e.state == "drifting"] == []


def test_change_point_finds_where_misses_began() -> None:
    outcomes = [(i, 0.0) for i in range(100)] + [(100 + i, 1.0) for i in range(30)]
    assert change_point(outcomes, 0.1) == 100
    assert change_point(outcomes[:3], 0.1) == 0


def test_monitor_without_reference_watches_concept_only() -> None:
    m = DriftMonitor(None, 0.5, label_window=100)
    assert m.data is None and m.concept.every == 20
    for i in range(100):
        m.concept.observe(i % 10 == 0, 0.9 if i % 10 == 0 else 0.1, 0.0, 0.5, i)
    assert not math.isnan(m.concept.metrics["xgboost"]["auc"])


def test_data_drift_finds_the_same_in_small_batches_as_in_whole_hours() -> None:
    """Rows of hours already begun wait to be binned together: the events and the PSI come out
    as if every batch had been counted at once."""
    rng = np.random.default_rng(8)
    X, s = world(rng, 10_000)
    ref = reference_of(X, NAMES, s)
    hours = [(h, *world(rng, 300, 0.0 if h < 60 else 1.5)) for h in range(100)]
    whole, small = DataDrift(ref, window_hours=24), DataDrift(ref, window_hours=24)
    got_whole, got_small = [], []
    for h, Xh, sh in hours:
        ts = h * HOUR_MS + np.sort(rng.integers(0, HOUR_MS, len(Xh)))
        got_whole += whole.observe(ts, Xh, sh)
        for i in range(0, len(ts), 7):
            got_small += small.observe(ts[i : i + 7], Xh[i : i + 7], sh[i : i + 7])
    assert got_small == got_whole and [e.what for e in got_whole if e.state == "drifting"] == ["a"]
    np.testing.assert_allclose(small.last_psi, whole.last_psi)


def test_monitor_config_is_the_same_in_another_process() -> None:
    """A restarted flow resumes the watch only if its configuration matches the snapshot's: the
    configuration must not depend on the process (Python's hash() of bytes is salted per process)."""
    import subprocess
    import sys

    code = (
        "import numpy as np; from models.drift import DriftMonitor, reference_of\n"
        "X = np.arange(200.0).reshape(100, 2); m = DriftMonitor(reference_of(X, ['a', 'b'], X[:, 0] / 100), 0.5)\n"
        "print(m.config)"
    )
    got = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(got) == 1 and "0.5" in got.pop()
