"""Drift, measured continuously: how far the traffic is from what the model was trained on (data
drift), and how well the models do on the labels that arrive (concept drift).

- `Reference`: each feature's and the XGBoost score's distribution over the training rows, as
  quantile bins plus a bin for missing values; `fraud train` stores it in the artifact.
- `DataDrift`: running bin counts per hour of event time over the scored transactions; at every
  new hour it computes the population stability index (PSI) of each feature and of the score over
  the last `window_hours` against the reference, and reports a feature that crosses the threshold
  (and when it comes back).
- `ConceptDrift`: prequential quality over a sliding window of the last labels (each label is
  judged with the scores the models give it before the online model learns it): ROC AUC, average
  precision, precision and recall at the threshold, for XGBoost, River and the final score; and a
  change detector from River's `drift` module (ADWIN) on each model's stream of errors on fraud
  labels (1 for a missed fraud), which reports when a model starts missing frauds it used to
  catch.

Both return `DriftEvent`s; the flow writes them to the `fraud:drift` stream. Pure Python (numpy
and River): no Bytewax, no Redis.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from river import drift

from models import evaluation

HOUR_MS = 3_600_000
EPS = 1e-4  # proportions below this count as this (an empty bin would make PSI infinite)
MODELS = ("xgboost", "river", "final")
MAX_RECENT = 2000  # fraud-label outcomes kept per detector to date a change
BIN_ROWS = 2048  # rows of the current hours gathered before they are binned
RECOVERY = 0.8  # a drifting column recovers once its PSI is below this share of the threshold


@dataclass(frozen=True)
class DriftEvent:
    """What drifted, by how much, and since when (event time, ms).

    `id` names the episode (kind, what, state, and the event time it was found at), so a replay
    after a crash, or several scorer replicas finding the same thing, write it once.
    """

    kind: str  # "data" (a feature's or the score's distribution) or "concept" (a model's errors)
    what: str  # the feature, "score", or the model whose errors changed
    state: str  # "drifting" or "recovered"
    value: float  # PSI, or the error rate after the change
    threshold: float  # PSI threshold, or the error rate before the change
    since_ms: int  # start of the window (data) or of the changed stretch (concept)
    at_ms: int  # event time at which it was found
    detail: str = ""

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.what}:{self.state}:{self.at_ms}"


# --- reference ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """Bins and training proportions per column (the features, then "score").

    Column c's finite values fall in bin 1 + searchsorted(edges[c], x, "right"); missing and
    infinite values in bin 0. `expected[c]` holds the training proportions of its bins (padded
    with zeros to the widest column).
    """

    names: tuple[str, ...]
    edges: tuple[np.ndarray, ...]
    expected: np.ndarray  # (columns, width)

    @property
    def width(self) -> int:
        return int(self.expected.shape[1])

    def bins(self, X: np.ndarray) -> np.ndarray:
        """Bin index of every value of `X` (rows x columns, the columns in `names` order): what
        searchsorted(edges[c], x, "right") + 1 gives per column, for all columns in one pass
        (the edges padded with +inf, which only infinities reach, and they go to bin 0). One
        comparison of the whole matrix per edge rank: numpy sums a short last axis slowly."""
        B = np.ones(X.shape, dtype=np.int64)
        for edges in self.padded.T:  # the k-th edge of every column
            B += np.greater_equal(X, edges)
        B[~np.isfinite(X)] = 0
        return B

    @cached_property
    def column(self) -> dict[str, int]:
        """The index of each column's name."""
        return {name: c for c, name in enumerate(self.names)}

    @cached_property
    def padded(self) -> np.ndarray:
        """The edges as one (columns, most edges) matrix, padded with +inf."""
        out = np.full((len(self.edges), max((len(e) for e in self.edges), default=0)), np.inf)
        for c, e in enumerate(self.edges):
            out[c, : len(e)] = e
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "edges": [e.tolist() for e in self.edges],
            "expected": [[round(float(p), 8) for p in row] for row in self.expected],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Reference:
        names = tuple(doc["names"])
        edges = tuple(np.asarray(e, dtype=np.float64) for e in doc["edges"])
        expected = np.asarray(doc["expected"], dtype=np.float64)
        if not (len(names) == len(edges) == expected.shape[0]):
            raise ValueError("reference: names, edges and expected differ in length")
        for c, e in enumerate(edges):
            if e.ndim != 1 or len(e) + 2 > expected.shape[1] or (np.diff(e) <= 0).any():
                raise ValueError(f"reference: bad edges for column {names[c]!r}")
        return cls(names, edges, expected)


def reference_of(X: np.ndarray, names: Sequence[str], scores: np.ndarray, bins: int = 10) -> Reference:
    """The reference of training matrix `X` (its feature `names`) and its XGBoost `scores`."""
    M = np.column_stack([np.asarray(X, dtype=np.float64), np.asarray(scores, dtype=np.float64)])
    cols = [*names, "score"]
    quantiles = np.linspace(0, 1, bins + 1)[1:-1]
    edges: list[np.ndarray] = []
    for c in range(M.shape[1]):
        finite = M[:, c][np.isfinite(M[:, c])]
        edges.append(np.unique(np.quantile(finite, quantiles)) if len(finite) else np.empty(0))
    width = max(len(e) for e in edges) + 2
    ref = Reference(tuple(cols), tuple(edges), np.zeros((len(cols), width)))
    counts = _counts(ref.bins(M), width)
    return Reference(ref.names, ref.edges, counts / max(len(M), 1))


def _counts(B: np.ndarray, width: int) -> np.ndarray:
    """(columns, width) counts of the bin indices in `B` (rows x columns)."""
    cols = B.shape[1]
    flat = (np.arange(cols) * width + B).ravel()
    return np.bincount(flat, minlength=cols * width).reshape(cols, width).astype(np.float64)


def psi(actual: np.ndarray, expected: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Population stability index per row of `actual` counts against `expected` proportions,
    over the bins `used` marks (a column's bins beyond its edges are padding)."""
    n = actual.sum(axis=1, keepdims=True)
    a = np.maximum(actual / np.maximum(n, 1), EPS)
    e = np.maximum(expected, EPS)
    return np.asarray(np.where(used, (a - e) * np.log(a / e), 0.0).sum(axis=1))


# --- data drift ---------------------------------------------------------------------------------


class DataDrift:
    """PSI of every feature and of the score over the last `window_hours` of event time."""

    def __init__(
        self,
        reference: Reference,
        *,
        window_hours: int = 168,
        threshold: float = 0.25,
        min_rows: int = 500,
    ) -> None:
        self.ref = reference
        self.window = window_hours
        self.threshold = threshold
        self.min_rows = min_rows
        self.used = np.zeros(reference.expected.shape, dtype=bool)
        for c, e in enumerate(reference.edges):
            self.used[c, : len(e) + 2] = True
        self.hours: dict[int, np.ndarray] = {}  # hour of event time -> counts
        self.total = np.zeros(reference.expected.shape)  # the sum of `hours` (counts are exact)
        self.newest: int | None = None
        self.first: int | None = None  # first hour seen: no window is judged before it is full
        self.waiting: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # rows not binned yet
        self.waiting_rows = 0
        self.last_psi = np.full(len(reference.names), np.nan)
        self.judged = 0  # windows judged so far (`last_psi` changes with it)
        self.since: dict[str, int] = {}  # columns drifting now -> window start when first found

    def observe(self, ts_ms: np.ndarray, X: np.ndarray, scores: np.ndarray) -> list[DriftEvent]:
        """Count a batch of scored transactions (event times, feature matrix, XGBoost scores);
        return the events of the hours this batch closed."""
        if not len(ts_ms):
            return []
        ts = np.asarray(ts_ms, dtype=np.int64)
        new_hour = self.newest is None or int(ts.max()) // HOUR_MS > self.newest
        # Until an hour begins there is nothing to judge: rows wait and are binned together
        # (binning costs a call per column, whatever the number of rows). The counts come out as
        # if each batch had been counted at once: every waiting row's hour is at most `newest`.
        self.waiting.append((ts, np.asarray(X), np.asarray(scores)))
        self.waiting_rows += len(ts)
        if not new_hour and self.waiting_rows < BIN_ROWS:
            return []
        ts, X, scores = (np.concatenate([w[i] for w in self.waiting]) for i in range(3))
        self.waiting, self.waiting_rows = [], 0
        M = np.column_stack([np.asarray(X, dtype=np.float64), np.asarray(scores, dtype=np.float64)])
        B = self.ref.bins(M)
        hours = ts // HOUR_MS
        events: list[DriftEvent] = []
        for h in np.unique(hours):
            hour = int(h)
            if self.newest is not None and hour <= self.newest - self.window:
                continue  # older than the window: it can no longer change a result
            if self.newest is not None and hour > self.newest:
                events += self._evaluate(hour)
            if self.newest is None or hour > self.newest:
                self.newest = hour
            if self.first is None or hour < self.first:
                self.first = hour
            counts = _counts(B[hours == h], self.ref.width)
            held = self.hours.get(hour)
            self.hours[hour] = counts if held is None else held + counts
            self.total += counts
        return events

    def _evaluate(self, hour: int) -> list[DriftEvent]:
        """PSI over the `window` hours before `hour` (all complete once `hour` has begun)."""
        start = hour - self.window
        for h in [h for h in self.hours if h < start]:
            self.total -= self.hours.pop(h)
        if self.first is None or start < self.first:
            return []  # the window is not full yet (a day's cycle would be judged in part)
        actual = self.total  # every hour held is in [start, hour): none is newer than `newest`
        if actual[0].sum() < self.min_rows:
            return []
        values = psi(actual, self.ref.expected, self.used)
        self.last_psi = values
        self.judged += 1
        events = []
        names = self.ref.names
        # Only the columns that cross a threshold can change state: found with numpy, then taken
        # one by one in column order.
        crossing = values > self.threshold
        if self.since:
            held = np.zeros(len(names), dtype=bool)
            column = self.ref.column
            held[[column[name] for name in self.since]] = True
            crossing = (crossing & ~held) | ((values <= self.threshold * RECOVERY) & held)
        for c in np.flatnonzero(crossing).tolist():
            name, v = names[c], values[c]
            drifting = name in self.since
            if v > self.threshold and not drifting:
                self.since[name] = start * HOUR_MS
                events.append(
                    DriftEvent(
                        "data", name, "drifting", float(v), self.threshold, start * HOUR_MS, hour * HOUR_MS
                    )
                )
            elif v <= self.threshold * RECOVERY and drifting:
                since = self.since.pop(name)
                events.append(
                    DriftEvent("data", name, "recovered", float(v), self.threshold, since, hour * HOUR_MS)
                )
        return events


# --- concept drift ------------------------------------------------------------------------------


class ConceptDrift:
    """Prequential quality over the last `window` labels and ADWIN on each model's misses.

    Each label comes with the scores the models give its transaction's features before the online
    model learns it. Quality is recomputed every `every` labels (`metrics`). For each model, the
    detector reads 1 for a fraud label the model scores below the threshold and 0 for one it
    catches; a change up in that rate is a concept-drift event (a change down, once it was
    drifting, is its recovery).
    """

    def __init__(
        self, threshold: float, *, window: int = 5000, every: int = 500, delta: float = 0.002
    ) -> None:
        self.threshold = threshold
        self.window = window
        self.every = every
        self.delta = delta
        # Rings of the last `window` labels, as plain arrays (one element store per label is far
        # cheaper there than in numpy); numpy reads them when the metrics are recomputed.
        self.y = bytearray(window)
        self.scores = [array("d", bytes(8 * window)) for _ in MODELS]
        self.n = 0  # labels seen
        # clock=1: check for a change at every fraud label (they are few; River checks every 32nd by default)
        self.detectors = {m: drift.ADWIN(delta=delta, clock=1) for m in ("xgboost", "final")}
        self.recent: dict[str, list[tuple[int, float]]] = {
            m: [] for m in self.detectors
        }  # (label time, miss)
        self.since: dict[str, int] = {}  # models drifting now -> when their change began
        self.metrics: dict[str, dict[str, float]] = {}
        self.measured = 0  # times `metrics` was recomputed

    def observe(self, is_fraud: bool, xgb: float, river: float, final: float, ts_ms: int) -> list[DriftEvent]:
        i = self.n % self.window
        self.y[i] = is_fraud
        self.scores[0][i], self.scores[1][i], self.scores[2][i] = xgb, river, final
        self.n += 1
        if self.n % self.every == 0:
            self._measure()
        if not is_fraud:
            return []
        events = []
        for model, score in (("xgboost", xgb), ("final", final)):
            det = self.detectors[model]
            before = det.estimation if det.width else math.nan
            miss = 1.0 if not score >= self.threshold else 0.0  # a NaN score counts as a miss
            det.update(miss)
            recent = self.recent[model]
            recent.append((ts_ms, miss))
            if len(recent) > MAX_RECENT:
                del recent[: len(recent) - MAX_RECENT]
            if not det.drift_detected or math.isnan(before):
                continue
            after = det.estimation
            if after > before and model not in self.since:
                since = change_point(recent[-int(det.width) :], before)
                self.since[model] = since
                events.append(
                    DriftEvent(
                        "concept", model, "drifting", float(after), float(before), since, ts_ms,
                        f"share of fraud labels {model} misses at threshold {self.threshold:.4f}",
                    )
                )  # fmt: skip
            elif after < before and model in self.since:
                since = self.since.pop(model)
                events.append(
                    DriftEvent("concept", model, "recovered", float(after), float(before), since, ts_ms)
                )
        return events

    def _measure(self) -> None:
        k = min(self.n, self.window)
        y = np.frombuffer(self.y, dtype=bool)[:k]
        out: dict[str, dict[str, float]] = {}
        for j, model in enumerate(MODELS):
            s = np.frombuffer(self.scores[j], dtype=np.float64)[:k]
            alert = s >= self.threshold
            tp = int((alert & y).sum())
            auc, ap = evaluation.auc_and_average_precision(y, s)
            out[model] = {
                "auc": auc,
                "average_precision": ap,
                "precision": tp / int(alert.sum()) if alert.any() else math.nan,
                "recall": tp / int(y.sum()) if y.any() else math.nan,
            }
        self.metrics = out
        self.measured += 1


def change_point(outcomes: Sequence[tuple[int, float]], before: float) -> int:
    """When the misses in `outcomes` (label time, 1.0 for a miss) started to run above `before`:
    the start of the suffix whose excess over `before`, scaled by the square root of its length,
    is largest (at least 5 labels long)."""
    misses = np.asarray([m for _, m in outcomes], dtype=np.float64)
    n = len(misses)
    if n < 5:
        return outcomes[0][0] if outcomes else 0
    tail = np.cumsum(misses[::-1])[::-1]  # misses from k to the end
    length = np.arange(n, 0, -1, dtype=np.float64)
    score = (tail / length - before) * np.sqrt(length)
    score[n - 4 :] = -np.inf
    return outcomes[int(np.argmax(score))][0]


# --- both, as the scorer holds them -------------------------------------------------------------


class DriftMonitor:
    """The scorer's drift watch: data drift when the artifact has a reference, concept drift
    always. Picklable: it is part of the scorer's snapshot."""

    def __init__(
        self,
        reference: Reference | None,
        threshold: float,
        *,
        window_hours: int = 168,
        psi_threshold: float = 0.25,
        min_rows: int = 500,
        label_window: int = 5000,
        delta: float = 0.002,
    ) -> None:
        self.data = (
            None
            if reference is None
            else DataDrift(reference, window_hours=window_hours, threshold=psi_threshold, min_rows=min_rows)
        )
        self.concept = ConceptDrift(
            threshold, window=label_window, every=max(label_window // 5, 1), delta=delta
        )
        ref = b"" if reference is None else reference.expected.tobytes() + repr(reference.names).encode()
        digest = hashlib.sha256(ref).hexdigest()  # not hash(): salted per process, and this outlives one
        self.config = (digest, threshold, window_hours, psi_threshold, min_rows, label_window, delta)
        """What the watch was built with: a snapshot taken under another configuration (another
        reference, threshold or setting) is not resumed (`Scorer.restore`)."""
