"""What a user sees of the score combination and the alert threshold, through the whole flow.

Planted bugs these catch (issue 18): the online weight applied to the XGBoost score instead of
River's (the combination's arguments swapped in serving), and the alert boundary `>=` turned
into `>`.
"""

from __future__ import annotations

import pytest

from features.event_files import merged_records
from fraud.datagen import GeneratorConfig, write_files
from models.serving import Decision
from service.settings import Settings
from testkit.run import decisions_of


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, list[object]]:
    out = tmp_path_factory.mktemp("contract")
    write_files(out, GeneratorConfig(seed=13, days=12, n_cards=60, n_merchants=50, drift_day=None))
    txns, labels = out / "transactions.jsonl", out / "labels.jsonl"
    settings = Settings(
        transactions_path=txns, labels_path=labels, online_warmup_labels=50, progress_interval_s=600
    )
    records: list[object] = [(k, line, f"{k}:{n + 1}") for k, line, n in merged_records(txns, labels)]
    return settings, records


def _run(world: tuple[Settings, list[object]], **overrides: object) -> list[Decision]:
    settings, records = world
    return decisions_of(settings.model_copy(update=overrides), records)


def test_with_online_weight_zero_the_final_score_is_xgboost_s_whatever_river_says(
    world: tuple[Settings, list[object]],
) -> None:
    """FRAUD_ONLINE_WEIGHT=0 serves XGBoost alone: its validated threshold holds exactly, even once
    River is warm and scoring; with a weight River only adds evidence, never takes it away."""
    alone = _run(world, online_weight=0.0)
    assert sum(d.online > 0 for d in alone) >= 50  # River is warm and has its say
    assert all(d.score == d.xgb for d in alone)
    assert [d.txn.txn_id for d in alone if d.alert] == [d.txn.txn_id for d in alone if d.xgb >= d.threshold]

    blended = _run(world, online_weight=0.5)
    assert all(d.score >= d.xgb for d in blended)
    # River adds half its probability of what XGBoost left unexplained: noisy-or, weight on River.
    for d in blended:
        assert d.score == pytest.approx(1 - (1 - d.xgb) * (1 - 0.5 * d.online), abs=1e-12), d.txn.txn_id
    lifted = [d for d in blended if d.online > 0.5 and d.xgb < 0.1]
    assert lifted and all(d.score > d.xgb + 0.2 for d in lifted)


def test_a_score_exactly_at_the_threshold_alerts(world: tuple[Settings, list[object]]) -> None:
    """The threshold is the lowest alerting score: set it to a transaction's exact final score and
    that transaction alerts; a hair above, it does not."""
    first = _run(world, threshold=0.5)
    scores = sorted({d.score for d in first if 0.01 < d.score < 0.99})
    assert scores
    at = scores[len(scores) // 2]
    on = {d.txn.txn_id: d for d in _run(world, threshold=at)}
    exactly = [d for d in on.values() if d.score == at]
    assert exactly and all(d.alert and d.action == "alert" for d in exactly)
    assert all(d.alert == (d.score >= at) for d in on.values())
    above = {d.txn.txn_id: d for d in _run(world, threshold=float(at) + 1e-12)}
    assert not any(above[d.txn.txn_id].alert for d in exactly)
