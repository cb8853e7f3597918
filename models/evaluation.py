"""Binary-classification metrics in plain numpy (no sklearn dependency).

Fraud evaluation is dominated by the rare positive class, so the headline numbers are ROC AUC,
average precision (area under the precision-recall curve, sklearn's step-wise definition) and
precision/recall at the alert threshold. Degenerate inputs (empty, or a single class) return
`float("nan")` instead of raising: a replay window without any fraud is a fact to report, not a
crash. Malformed inputs (shape mismatch, labels other than 0/1, NaN scores) still raise
`ValueError` because they are bugs upstream.

Convention everywhere: a transaction alerts when `score >= threshold`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

NAN = float("nan")


def _check(y: npt.ArrayLike, s: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise labels to bool and scores to float64, both 1-D and equally long."""
    ya = np.asarray(y)
    sa = np.asarray(s, dtype=np.float64)
    if ya.ndim != 1 or sa.ndim != 1 or ya.shape != sa.shape:
        raise ValueError(f"y and s must be 1-D of equal length, got {ya.shape} and {sa.shape}")
    if ya.dtype != np.bool_:
        if ya.size and not np.isin(ya, (0, 1)).all():
            raise ValueError("y must contain only 0/1 or booleans")
        ya = ya.astype(bool)
    if np.isnan(sa).any():
        raise ValueError("scores contain NaN")
    return ya, sa


def _curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives at each distinct threshold, highest threshold first.

    Equal scores are grouped: a threshold either alerts on all of them or on none, which is how
    ties are handled by every metric built on top of this. Their order inside a group is read
    nowhere (only each group's last cumulative count), so the sort need not be stable (numpy's
    default sort is the faster one on the drift watch's 5,000 changing scores).
    """
    order = np.argsort(-s)
    s_sorted = s[order]
    y_sorted = y[order]
    # Index of the last element of each group of equal scores (callers never pass empty arrays).
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return s_sorted[last], tps, fps


def roc_auc(y: npt.ArrayLike, s: npt.ArrayLike) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties = 1/2."""
    ya, sa = _check(y, s)
    return _auc(ya, _curve(ya, sa) if ya.size else None)


def average_precision(y: npt.ArrayLike, s: npt.ArrayLike) -> float:
    """Average precision as sklearn defines it: sum over thresholds of (R_n - R_{n-1}) * P_n.

    No interpolation (unlike the trapezoidal PR-AUC, which is optimistic for rare positives).
    """
    ya, sa = _check(y, s)
    return _ap(ya, _curve(ya, sa) if ya.size else None)


def auc_and_average_precision(y: npt.ArrayLike, s: npt.ArrayLike) -> tuple[float, float]:
    """`(roc_auc(y, s), average_precision(y, s))` from one sort of the scores."""
    ya, sa = _check(y, s)
    curve = _curve(ya, sa) if ya.size else None
    return _auc(ya, curve), _ap(ya, curve)


Curve = tuple[np.ndarray, np.ndarray, np.ndarray]


def _auc(y: np.ndarray, curve: Curve | None) -> float:
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0 or curve is None:
        return NAN
    _, tps, fps = curve
    tpr = np.r_[0, tps] / n_pos
    fpr = np.r_[0, fps] / n_neg
    # Trapezoids over grouped thresholds count tied positive/negative pairs as one half.
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _ap(y: np.ndarray, curve: Curve | None) -> float:
    n_pos = int(y.sum())
    if n_pos == 0 or curve is None:
        return NAN
    _, tps, fps = curve
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def precision_recall_at(y: npt.ArrayLike, s: npt.ArrayLike, threshold: float) -> tuple[float, float, int]:
    """`(precision, recall, n_alerts)` when alerting on `score >= threshold`.

    Precision is NaN when nothing alerts; recall is NaN when there are no positives.
    """
    ya, sa = _check(y, s)
    alerts = sa >= threshold
    n_alerts = int(alerts.sum())
    tp = int((alerts & ya).sum())
    n_pos = int(ya.sum())
    precision = tp / n_alerts if n_alerts else NAN
    recall = tp / n_pos if n_pos else NAN
    return precision, recall, n_alerts


def threshold_for_precision(y: npt.ArrayLike, s: npt.ArrayLike, target_precision: float) -> float:
    """Lowest threshold (hence highest recall) whose precision reaches `target_precision`.

    Only observed scores are candidate thresholds. NaN when no threshold reaches the target or
    there are no positives: an alert threshold of NaN alerts on nothing, which is the honest
    outcome of an unreachable target.
    """
    ya, sa = _check(y, s)
    if not ya.any():
        return NAN
    thresholds, tps, fps = _curve(ya, sa)
    ok = tps / (tps + fps) >= target_precision
    if not ok.any():
        return NAN
    # Thresholds are descending, so the last qualifying one is the lowest.
    return float(thresholds[np.flatnonzero(ok)[-1]])


def best_f1_threshold(y: npt.ArrayLike, s: npt.ArrayLike) -> float:
    """Observed score that maximises F1 when used as threshold; the highest such on ties.

    Preferring the highest threshold among equals means fewer alerts for the same F1. NaN when
    there are no positives.
    """
    ya, sa = _check(y, s)
    n_pos = int(ya.sum())
    if n_pos == 0:
        return NAN
    thresholds, tps, fps = _curve(ya, sa)
    f1 = 2.0 * tps / (n_pos + tps + fps)  # 2PR/(P+R) == 2TP/(positives + alerts)
    return float(thresholds[int(np.argmax(f1))])


def evaluate(y: npt.ArrayLike, s: npt.ArrayLike, threshold: float) -> dict[str, Any]:
    """All headline numbers in one JSON-friendly dict (plain Python floats and ints)."""
    ya, sa = _check(y, s)
    precision, recall, n_alerts = precision_recall_at(ya, sa, threshold)
    return {
        "auc": roc_auc(ya, sa),
        "ap": average_precision(ya, sa),
        "precision": precision,
        "recall": recall,
        "alerts": n_alerts,
        "positives": int(ya.sum()),
        "n": int(ya.size),
        "threshold": float(threshold),
    }


def card_precision_at_k(
    day: npt.ArrayLike, card: npt.ArrayLike, y: npt.ArrayLike, s: npt.ArrayLike, k: int
) -> float:
    """Card Precision@k: per day, the share of fraudulent cards among the k highest-scored cards,
    averaged over the days present.

    A card's score on a day is its highest transaction score that day and it counts as fraudulent
    if any of its transactions that day is: investigators review cards, not transactions, and
    each card once. A day with fewer than k cards still divides by k (the review capacity), as the
    textbook protocol does. Ties between cards are broken by card order, deterministically. NaN
    when there are no rows.
    """
    ya, sa = _check(y, s)
    d = np.asarray(day)
    c = np.asarray(card)
    if d.shape != ya.shape or c.shape != ya.shape:
        raise ValueError("day, card, y and s must have equal length")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if ya.size == 0:
        return NAN
    day_idx = np.unique(d, return_inverse=True)[1].reshape(-1).astype(np.int64)
    card_idx = np.unique(c, return_inverse=True)[1].reshape(-1).astype(np.int64)
    # One group per (day, card), then each group's highest score and whether any row is fraud.
    n_cards = int(card_idx.max()) + 1
    groups, keys = np.unique(day_idx * n_cards + card_idx, return_inverse=True)
    keys = keys.reshape(-1)
    score = np.full(groups.size, -np.inf)
    np.maximum.at(score, keys, sa)
    fraud = np.zeros(groups.size, dtype=bool)
    np.logical_or.at(fraud, keys, ya)
    group_day = groups // n_cards
    precisions = []
    for g_day in np.unique(group_day):
        members = np.flatnonzero(group_day == g_day)
        top = members[np.argsort(-score[members], kind="stable")[:k]]
        precisions.append(fraud[top].sum() / k)
    return float(np.mean(precisions))
