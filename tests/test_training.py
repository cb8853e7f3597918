"""The training protocol: which labels a model may learn from, the gap, who is judged, the search."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fraud.cli import app
from fraud.dataset import DAY_MS, NO_LABEL, Dataset
from fraud.train import Calendar, Split, fit, parse_when
from models.drift import Reference
from models.xgb import SEARCH_GRID, tune_xgb
from service.settings import get_settings

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
H = 3_600_000


def dataset(rows: list[tuple[float, str, int, float | None]]) -> Dataset:
    """Rows of (day + fraction, card, label 1/0/-1, label arrival in days or None)."""
    ts = [T0 + round(d * DAY_MS) for d, *_ in rows]
    ids = [f"t{i}" for i in range(len(rows))]
    labels = {
        i: (bool(y), T0 + round(at * DAY_MS))
        for i, (_, _, y, at) in zip(ids, rows, strict=True)
        if y >= 0 and at is not None
    }
    return Dataset.of(np.zeros((len(rows), 1)), ts, ids, [c for _, c, *_ in rows], labels)


def test_training_uses_only_labels_arrived_by_the_end_of_training() -> None:
    data = dataset(
        [
            (0.5, "a", 0, 3.0),  # genuine, confirmed on day 3: known by the end (day 5)
            (1.5, "b", 1, 4.9),  # fraud known just before the end
            (2.5, "c", 1, 5.0),  # fraud whose chargeback came at the end: unknown then
            (4.5, "d", 0, 9.0),  # genuine but confirmed later: not a negative, left out
            (5.5, "e", 0, 6.0),  # after the training period
        ]
    )
    assert data.training_rows(0, 5).tolist() == [True, True, False, False, False]


def test_cards_already_known_compromised_are_not_judged_from_the_next_day() -> None:
    data = dataset(
        [
            (1.2, "a", 1, 2.5),  # fraud on card a, its label arrives on day 2 at noon
            (2.9, "a", 1, 9.0),  # same day as the label: the card was not known at the day's start
            (3.1, "a", 0, 9.0),  # the next day: known compromised, not judged
            (3.2, "b", 0, 9.0),
            (3.3, "c", -1, None),  # never labelled: not judged
        ]
    )
    assert data.known_compromised.tolist() == [False, False, True, False, False]
    assert data.evaluation_rows(0, 4).tolist() == [True, True, False, True, False]
    assert data.day.tolist() == [0, 1, 2, 2, 2]  # counted from the first transaction's day


def test_split_leaves_the_label_delay_between_training_and_validation() -> None:
    s = Split(train_days=14, valid_days=7, test_days=7, gap_days=7, start_day=28)
    assert (s.train, s.valid, s.test) == ((28, 42), (49, 56), (56, 63))


def test_tuning_keeps_the_candidate_with_the_best_validation_ap() -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, 4)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] * X[:, 2] + rng.normal(scale=0.8, size=3000) > 2.2).astype(np.int8)
    names = ["a", "b", "c", "d"]
    grid = SEARCH_GRID[:3]
    booster, params, log = tune_xgb(X[:2000], y[:2000], names, (X[2000:], y[2000:]), grid=grid)
    assert len(log) == 3
    best = max(range(3), key=lambda i: log[i]["valid_ap"])
    assert params == grid[best]
    assert booster.num_boosted_rounds() == log[best]["rounds"]


def test_fit_reports_every_metric_and_refuses_a_period_without_fraud() -> None:
    rng = np.random.default_rng(5)
    n_days, per_day = 30, 120
    day = np.repeat(np.arange(n_days), per_day) + rng.uniform(0, 0.9, n_days * per_day)
    cards = rng.integers(0, 400, size=day.size)
    fraud = rng.random(day.size) < 0.03
    X = np.c_[2 * fraud + rng.normal(scale=0.7, size=day.size), rng.normal(size=day.size)].astype(np.float32)
    ts = (T0 + day * DAY_MS).astype(np.int64)
    ids = [f"t{i}" for i in range(day.size)]
    labels = {i: (bool(f), int(t + 3 * DAY_MS)) for i, f, t in zip(ids, fraud, ts, strict=True)}
    data = Dataset.of(X, ts.tolist(), ids, [f"c{c}" for c in cards], labels)
    split = Split(train_days=10, valid_days=5, test_days=5, gap_days=3, start_day=2)
    fitted = fit(data, ["signal", "noise"], split, k=20, search=False)
    test = fitted.report["test"]
    assert set(test) >= {"auc", "ap", "card_precision_at_k", "precision", "recall", "k"}
    assert test["auc"] > 0.8 and 0 < test["card_precision_at_k"] <= 1
    assert fitted.report["periods_days"]["validation"] == (15, 20)
    assert fitted.report["train"]["rows"] == int(data.training_rows(2, 12).sum())
    assert len(fitted.report["search"]) == 1
    with pytest.raises(ValueError, match="test period has no fraud"):
        fit(data, ["signal", "noise"], Split(10, 5, 5, 3, start_day=12), search=False)


def test_no_label_sorts_after_every_time() -> None:
    assert NO_LABEL > T0 + 10**6 * DAY_MS


@pytest.fixture(scope="module")
def late_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small late-pattern world, written by `fraud generate --world` (labels after the end kept)."""
    out = tmp_path_factory.mktemp("world")
    result = CliRunner().invoke(
        app, ["generate", "--world", "late-pattern", "--cards", "700", "--merchants", "100", "--seed", "4",
              "--out", str(out), "--no-gzip"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_cli_train_and_evaluate_report_the_protocol_metrics(late_world: Path, tmp_path: Path) -> None:
    """`fraud train` saves an artifact whose report has every metric per period; `fraud evaluate`
    judges XGBoost alone and with River by the same rules, and River learns the new pattern."""
    files = [
        "--transactions",
        str(late_world / "transactions.jsonl"),
        "--labels",
        str(late_world / "labels.jsonl"),
    ]
    result = CliRunner().invoke(
        app, ["train", *files, "--out", str(tmp_path / "model"), "--start-day", "28", "--train-days", "14",
              "--valid-days", "7", "--test-days", "7", "--no-search", "--k", "20"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["periods_days"] == {"train": [28, 42], "validation": [49, 56], "test": [56, 63]}
    day0 = datetime.fromisoformat(report["periods"]["train"][0]) - timedelta(days=28)
    assert day0.hour == day0.minute == 0  # periods count whole UTC days from the first one

    # The same periods as calendar bounds give the same model; the report names the exact bounds.
    iso = {k: v for k, v in zip(("from", "to"), report["periods"]["train"], strict=True)}
    calendar = CliRunner().invoke(
        app, ["train", *files, "--out", str(tmp_path / "calendar"), "--train-from", iso["from"],
              "--train-to", iso["to"], "--valid-to", report["periods"]["validation"][1],
              "--test-to", (day0 + timedelta(days=63)).date().isoformat(), "--no-search", "--k", "20"],
    )  # fmt: skip
    assert calendar.exit_code == 0, calendar.output
    by_dates = json.loads(calendar.stdout)
    assert by_dates["periods"] == report["periods"] and by_dates["periods_days"] == report["periods_days"]
    assert (tmp_path / "calendar" / "model.ubj").read_bytes() == (
        tmp_path / "model" / "model.ubj"
    ).read_bytes()
    assert report["fraud_label_delay_days"]["p50"] > 0.5
    meta = json.loads((tmp_path / "model" / "meta.json").read_text())
    for period in ("validation", "test"):
        assert {"auc", "ap", "card_precision_at_k", "precision", "recall"} <= set(meta["metrics"][period])
        assert meta["metrics"][period]["k"] == 20
    # The drift reference: every feature and the score, binned over the training rows.
    ref = Reference.from_json(meta["reference"])
    assert ref.names == (*meta["feature_names"], "score")
    np.testing.assert_allclose(ref.expected.sum(axis=1), 1.0, atol=1e-6)
    assert sum(len(e) > 0 for e in ref.edges) > len(ref.names) // 2
    get_settings.cache_clear()  # the next command reads FRAUD_MODEL_PATH
    result = CliRunner().invoke(
        app, ["evaluate", *files, "--start-day", "42", "--drift-day", "49", "--end-day", "63", "--k", "20"],
        env={"FRAUD_MODEL_PATH": str(tmp_path / "model")},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    after = json.loads(result.stdout)["periods"]["after_drift"]
    assert {"auc", "ap", "card_precision_at_k"} <= set(after["xgboost"]) and after["combined"]["k"] == 20
    caught = {
        m: int(after[m]["caught_by_pattern"]["merchant_cashout"].split("/")[0]) for m in after if m != "days"
    }
    assert caught["combined"] > caught["xgboost"]


def test_calendar_bounds_are_parsed_exactly_and_refused_out_of_order() -> None:
    assert parse_when("2026-02-01") == parse_when("2026-02-01T00:00:00Z") == 1_769_904_000_000
    assert parse_when("2026-02-01T06:00:00+01:00") == 1_769_904_000_000 + 5 * 3_600_000
    assert parse_when("1769904000000") == 1_769_904_000_000
    for bad in ("2026-02-01T06:00:00", "yesterday"):
        with pytest.raises(ValueError):
            parse_when(bad)
    day0 = 1_769_904_000_000
    split = Calendar(
        day0 + 10 * DAY_MS + DAY_MS // 2, day0 + 20 * DAY_MS, day0 + 25 * DAY_MS, day0 + DAY_MS, 3
    ).split(day0)
    assert (split.start_day, split.train_days, split.valid_days, split.test_days) == (1, 9.5, 6.5, 5)
    with pytest.raises(ValueError, match="validation period is empty"):
        Calendar(day0 + 10 * DAY_MS, day0 + 12 * DAY_MS, day0 + 20 * DAY_MS, None, 3).split(day0)


def test_cli_train_explains_a_period_without_fraud(late_world: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", "--transactions", str(late_world / "transactions.jsonl"), "--labels",
              str(late_world / "labels.jsonl"), "--out", str(tmp_path), "--start-day", "80", "--no-search"],
    )  # fmt: skip
    assert result.exit_code == 2 and "has no fraud labels" in result.output
