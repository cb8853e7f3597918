"""models.evaluation against brute-force definitions and hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.evaluation import (
    auc_and_average_precision,
    average_precision,
    best_f1_threshold,
    card_precision_at_k,
    evaluate,
    precision_recall_at,
    roc_auc,
    threshold_for_precision,
)

# Scores from a small grid so that ties are common; labels of either class.
samples = st.lists(st.tuples(st.booleans(), st.integers(0, 8).map(lambda i: i / 8)), max_size=40)
both_classes = samples.filter(lambda p: len({label for label, _ in p}) == 2)


def split(pairs: list[tuple[bool, float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([p[0] for p in pairs], dtype=bool), np.array([p[1] for p in pairs])


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    wins = [1.0 if sp > sn else 0.5 if sp == sn else 0.0 for sp in s[y] for sn in s[~y]]
    return sum(wins) / len(wins)


def brute_pr(y: np.ndarray, s: np.ndarray, t: float) -> tuple[float, float]:
    alerts = s >= t
    tp = (alerts & y).sum()
    return (tp / alerts.sum() if alerts.any() else math.nan), tp / y.sum()


def brute_ap(y: np.ndarray, s: np.ndarray) -> float:
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        precision, recall = brute_pr(y, s, t)
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


@given(both_classes)
def test_auc_matches_pairwise_definition(pairs: list[tuple[bool, float]]) -> None:
    y, s = split(pairs)
    assert roc_auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


@given(samples.filter(lambda p: any(label for label, _ in p)))
def test_ap_matches_step_definition(pairs: list[tuple[bool, float]]) -> None:
    y, s = split(pairs)
    assert average_precision(y, s) == pytest.approx(brute_ap(y, s), abs=1e-12)


@given(samples)
def test_auc_and_ap_from_one_sort_are_the_two_metrics(pairs: list[tuple[bool, float]]) -> None:
    """What the drift watch reads: the same floats (NaN where either is undefined) as the two calls."""
    y, s = split(pairs)
    got, want = auc_and_average_precision(y, s), (roc_auc(y, s), average_precision(y, s))
    assert [f"{v!r}" for v in got] == [f"{v!r}" for v in want]
    if len(set(y.tolist())) == 2:
        assert got[0] == pytest.approx(brute_auc(y, s), abs=1e-12)
        assert got[1] == pytest.approx(brute_ap(y, s), abs=1e-12)


@given(samples.filter(lambda p: any(label for label, _ in p)), st.integers(0, 9))
def test_precision_recall_at_matches_masks(pairs: list[tuple[bool, float]], k: int) -> None:
    y, s = split(pairs)
    t = k / 8
    precision, recall, n_alerts = precision_recall_at(y, s, t)
    want_p, want_r = brute_pr(y, s, t)
    assert n_alerts == int((s >= t).sum())
    assert recall == pytest.approx(want_r)
    assert (math.isnan(precision) and math.isnan(want_p)) or precision == pytest.approx(want_p)


@given(samples.filter(lambda p: any(label for label, _ in p)), st.floats(0.05, 1.0))
def test_threshold_for_precision_is_lowest_reaching_target(
    pairs: list[tuple[bool, float]], target: float
) -> None:
    y, s = split(pairs)
    t = threshold_for_precision(y, s, target)
    reaching = [u for u in set(s.tolist()) if brute_pr(y, s, u)[0] >= target]
    if not reaching:
        assert math.isnan(t)
    else:
        assert t == min(reaching)


@given(samples.filter(lambda p: any(label for label, _ in p)))
def test_best_f1_threshold_maximises_f1(pairs: list[tuple[bool, float]]) -> None:
    y, s = split(pairs)

    def f1(t: float) -> float:
        p, r = brute_pr(y, s, t)
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)

    best = max(f1(u) for u in set(s.tolist()))
    t = best_f1_threshold(y, s)
    assert f1(t) == pytest.approx(best)
    assert t == max(u for u in set(s.tolist()) if f1(u) == pytest.approx(best))


def test_hand_computed_cases() -> None:
    # sklearn's documented example: AUC 0.75, AP 0.8333...
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert roc_auc(y, s) == pytest.approx(0.75)
    assert average_precision(y, s) == pytest.approx(5 / 6)
    assert precision_recall_at(y, s, 0.35) == (pytest.approx(2 / 3), 1.0, 3)
    assert best_f1_threshold(y, s) == 0.35  # F1 0.8 at 0.35 beats 0.667 at 0.8
    assert threshold_for_precision(y, s, 1.0) == 0.8
    # Ties: three equal scores with two positives alert together -> AP 2/3, AUC 3/4.
    y, s = [1, 0, 1, 0], [0.5, 0.5, 0.5, 0.1]
    assert average_precision(y, s) == pytest.approx(2 / 3)
    assert roc_auc(y, s) == pytest.approx(0.75)
    assert roc_auc([1, 0], [0.3, 0.3]) == 0.5


def test_degenerate_inputs_give_nan() -> None:
    assert math.isnan(roc_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))
    assert math.isnan(roc_auc([], []))
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))
    assert average_precision([1, 1], [0.1, 0.2]) == 1.0
    assert math.isnan(best_f1_threshold([0, 0], [0.1, 0.2]))
    assert math.isnan(threshold_for_precision([0, 1], [0.9, 0.1], 0.99))
    precision, recall, n_alerts = precision_recall_at([0, 0], [0.1, 0.2], 0.5)
    assert math.isnan(precision) and math.isnan(recall) and n_alerts == 0


def test_evaluate_is_json_friendly() -> None:
    result = evaluate(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.6, 0.4]), 0.5)
    assert result == {
        "auc": 0.75,
        "ap": pytest.approx(5 / 6),
        "precision": 0.5,
        "recall": 0.5,
        "alerts": 2,
        "positives": 2,
        "n": 4,
        "threshold": 0.5,
    }
    assert all(type(v) in (int, float) for v in result.values())
    json.dumps(result)
    assert math.isnan(evaluate([0, 0], [0.2, 0.3], 0.5)["auc"])


def test_malformed_inputs_raise() -> None:
    with pytest.raises(ValueError, match="equal length"):
        roc_auc([0, 1], [0.5])
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2], [0.5, 0.6])
    with pytest.raises(ValueError, match="NaN"):
        average_precision([0, 1], [0.5, math.nan])


rows = st.lists(
    st.tuples(
        st.integers(0, 2), st.sampled_from("abcde"), st.booleans(), st.integers(0, 8).map(lambda i: i / 8)
    ),
    min_size=1,
    max_size=40,
)


@given(rows, st.integers(1, 6))
def test_card_precision_at_k_matches_a_per_day_card_ranking(
    data: list[tuple[int, str, bool, float]], k: int
) -> None:
    """Per day: each card once, at its highest score, fraudulent if any of its rows is; the top k
    cards (ties by card order); the share of frauds among them over k; the mean over days."""
    per_day = []
    for day in sorted({d for d, *_ in data}):
        cards: dict[str, tuple[float, bool]] = {}
        for d, card, fraud, score in data:
            if d == day:
                best, any_fraud = cards.get(card, (-1.0, False))
                cards[card] = (max(best, score), any_fraud or fraud)
        ranked = sorted(cards.items(), key=lambda c: (-c[1][0], c[0]))[:k]
        per_day.append(sum(f for _, (_, f) in ranked) / k)
    day, card, y, s = (np.array(col) for col in zip(*data, strict=True))
    assert card_precision_at_k(day, card, y, s, k) == pytest.approx(sum(per_day) / len(per_day))


def test_card_precision_at_k_hand_computed() -> None:
    # Day 0: card a (0.9, fraud on its other row) ranks first; day 1: card c (0.3) is genuine.
    day, card = [0, 0, 0, 1, 1], ["a", "a", "b", "a", "c"]
    y, s = [0, 1, 0, 0, 0], [0.9, 0.1, 0.5, 0.2, 0.3]
    assert card_precision_at_k(day, card, y, s, 1) == 0.5
    assert card_precision_at_k(day, card, y, s, 2) == 0.25  # day 0: 1 of 2; day 1: 0 of 2
    assert math.isnan(card_precision_at_k([], [], [], [], 3))
    with pytest.raises(ValueError):
        card_precision_at_k(day, card, y, s, 0)
