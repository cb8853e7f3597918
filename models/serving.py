"""Serving: turn feature vectors into decisions with both models, and learn from joined labels.

One `Scorer` serves the flow (one Bytewax step) and the offline evaluation of `fraud evaluate`,
so the score a transaction gets in a replay is the score it gets in production. XGBoost scores
each batch in one vectorised call; the online model predicts and learns one event at a time, in
arrival order, so a label teaches it only about transactions that come after it.
"""

from __future__ import annotations

import pickle
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from features.engine import FeatureVector, LabelEvent
from features.events import Transaction
from models.artifact import ModelArtifact
from models.combine import combine
from models.drift import DriftEvent, DriftMonitor
from models.online import OnlineModel, x_dict
from models.xgb import XGBScorer, positive_weight

Reason = tuple[str, float, float]  # (feature, value, contribution in log-odds)


@dataclass
class Decision:
    """A scored transaction: component scores, final score, and why when it alerts."""

    txn: Transaction
    values: list[float]
    xgb: float
    online: float
    score: float
    alert: bool
    late: bool
    latency_s: float | None
    reasons: list[Reason] = field(default_factory=list)


class LabelledVector(msgspec.Struct, frozen=True, gc=False):
    """A label joined to the feature values its transaction was scored with: what the online
    model learns. The flow keeps the values per transaction in a keyed step and sends this."""

    txn_id: str
    is_fraud: bool
    values: Sequence[float]
    seq: int = 0
    ts_ms: int = 0  # the label's event time (drift events say when)


Item = FeatureVector | LabelledVector


@dataclass
class BatchStats:
    rows: int = 0
    labels_learned: int = 0
    failed: list[tuple[Item, Exception]] = field(default_factory=list)
    """Items the scorer could not handle (the flow dead-letters them); the others are unaffected."""
    unexplained: int = 0  # alerts whose reasons could not be computed (sent with no reasons)
    learn_s: float = 0.0  # seconds the online model spent learning this batch's labels
    events: list[DriftEvent] = field(default_factory=list)  # drift found in this batch
    drift_error: Exception | None = None  # the data-drift watch failed on this batch (logged)


class Scorer:
    """XGBoost + River behind one `decide(items)` call; holds the online model's state."""

    def __init__(
        self,
        artifact: ModelArtifact,
        online: OnlineModel,
        *,
        threshold: float | None = None,
        online_weight: float = 0.5,
        batch_size: int = 256,
        top_reasons: int = 3,
        device: str = "cpu",
        nthread: int = 1,
        monitor: DriftMonitor | None = None,
    ) -> None:
        self.artifact = artifact
        self.monitor = monitor
        self.names = list(artifact.feature_names)
        self.xgb = XGBScorer(
            artifact.booster,
            self.names,
            device=device,
            nthread=nthread,
            positive_weight=positive_weight(artifact.params),
        )
        self.online = online
        self.threshold = artifact.threshold if threshold is None else threshold
        self.weight = online_weight
        self.batch_size = batch_size
        self.top_reasons = top_reasons
        self.last = BatchStats()

    def decide(self, items: Sequence[Item]) -> list[Decision]:
        """Decisions for the feature vectors in `items`; labelled vectors among them train the online
        model, in order, so a label teaches it only about the transactions after it.

        Never raises on account of one item: an item that makes a model raise is left out and
        listed in `self.last.failed` with its exception (the flow dead-letters it), and the rest
        of the batch is decided as if it were not there. A batch XGBoost call that fails is
        retried row by row, so only the offending rows are left out.
        """
        stats = self.last = BatchStats()
        vectors = [it for it in items if isinstance(it, FeatureVector)]
        concept = self.monitor.concept if self.monitor is not None else None
        labelled = [it.values for it in items if type(it) is LabelledVector] if concept is not None else []
        xgb_scores, X, label_xgb = self._xgb_scores(vectors, labelled, stats)
        skip = {id(it) for it, _ in stats.failed}
        decisions: list[Decision] = []
        decided: list[int] = []  # the row of `X` of each decision
        j = k = 0
        for it in items:
            try:
                if isinstance(it, LabelledVector):
                    started = time.perf_counter()
                    river = self.online.learn_one(x_dict(self.names, it.values), it.is_fraud)
                    stats.learn_s += time.perf_counter() - started
                    stats.labels_learned += 1
                    if concept is not None:
                        xs, k = float(label_xgb[k]), k + 1
                        final = float(combine(xs, river, self.weight))
                        stats.events += concept.observe(it.is_fraud, xs, river, final, it.ts_ms)
                    continue
                xs = float(xgb_scores[j])
                j += 1
                if skip and id(it) in skip:
                    continue
                online = (
                    self.online.predict_proba_one(x_dict(self.names, it.values)) if self.online.ready else 0.0
                )
                final = float(combine(xs, online, self.weight))
                decisions.append(
                    Decision(it.txn, it.values, xs, online, final, final >= self.threshold, it.late, None)
                )
                decided.append(j - 1)
            except Exception as exc:  # one poisoned item must not cost the batch its decisions
                stats.failed.append((it, exc))
        self._explain([d for d in decisions if d.alert], stats)
        data = self.monitor.data if self.monitor is not None else None
        if data is not None and decisions:
            try:
                rows = X[decided] if X is not None else np.asarray([d.values for d in decisions], np.float32)
                stats.events += data.observe(
                    np.fromiter((d.txn.ts_ms for d in decisions), dtype=np.int64, count=len(decisions)),
                    rows,
                    xgb_scores[decided],
                )
            except Exception as exc:  # drift is watched, never a reason to lose decisions
                stats.drift_error = exc
        now = time.time_ns()
        for d in decisions:
            if d.txn.received_ns:
                d.latency_s = (now - d.txn.received_ns) / 1e9
        return decisions

    def _xgb_scores(
        self, vectors: list[FeatureVector], labelled: list[Sequence[float]], stats: BatchStats
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """XGBoost's scores of `vectors`, their matrix (None if it could not be built), and its
        scores of the `labelled` vectors (the model is fixed: what it said at decision time), in
        the same calls. If the batch call fails, vectors are scored row by row (the failing ones
        listed) and labelled vectors get NaN."""
        if not vectors and not labelled:
            return np.empty(0), None, np.empty(0)
        X = None
        try:
            X = np.asarray([v.values for v in vectors] + labelled, dtype=np.float32)
            both = self._score_matrix(X)
            scores, label_scores = both[: len(vectors)], both[len(vectors) :]
        except Exception:
            scores = self._xgb_row_by_row(vectors, stats)
            label_scores = np.full(len(labelled), np.nan)
        stats.rows = len(vectors)
        return scores, (X[: len(vectors)] if X is not None else None), label_scores

    def _score_matrix(self, X: np.ndarray) -> np.ndarray:
        """One XGBoost call per `batch_size` rows of `X`."""
        return np.concatenate(
            [self.xgb.score(X[s : s + self.batch_size]) for s in range(0, len(X), self.batch_size)]
        )

    def _xgb_row_by_row(self, vectors: list[FeatureVector], stats: BatchStats) -> np.ndarray:
        """After a failed batch call: score each row alone, listing the rows that fail."""
        scores = np.full(len(vectors), np.nan)
        for i, v in enumerate(vectors):
            try:
                scores[i] = self.xgb.score(np.asarray([v.values], dtype=np.float32))[0]
            except Exception as exc:
                stats.failed.append((v, exc))
        return scores

    def _explain(self, alerts: list[Decision], stats: BatchStats) -> None:
        """Top positive XGBoost contributions of each alert: one `pred_contribs` call per batch.

        An alert whose explanation fails is still sent, with no reasons (counted in `stats`)."""
        if not (alerts and self.top_reasons):
            return
        try:
            X = np.asarray([d.values for d in alerts], dtype=np.float32)
            for d, reasons in zip(alerts, self.xgb.contributions(X, self.top_reasons), strict=True):
                d.reasons = reasons
        except Exception:
            for d in alerts:
                try:
                    X1 = np.asarray([d.values], dtype=np.float32)
                    d.reasons = self.xgb.contributions(X1, self.top_reasons)[0]
                except Exception:
                    d.reasons = []
                    stats.unexplained += 1

    def snapshot(self) -> tuple[Any, ...]:
        """Immutable copy: the online model and the drift watch as bytes (the scorer keeps
        nothing per transaction)."""
        return (pickle.dumps(self.online), pickle.dumps(self.monitor))

    def restore(self, snap: tuple[Any, ...]) -> None:
        """Resume the online model, and the drift watch when the snapshot's was built like this
        scorer's (the same reference and settings); otherwise the watch starts afresh, and it stays
        off when this scorer has none."""
        self.online = pickle.loads(snap[0])
        watch = pickle.loads(snap[1]) if len(snap) > 1 else None
        if self.monitor is not None and watch is not None and watch.config == self.monitor.config:
            self.monitor = watch


class PendingVectors:
    """Scored feature vectors waiting for their labels, for batch replays (`fraud evaluate`); the
    flow keeps each one in its own key of the `pending` step instead.

    `hold` each vector as it is scored, `join` each label into the `LabelledVector` the online
    model learns (None when its vector is not held). Vectors older than `ttl_ms` of event time
    behind the newest are forgotten, as the flow's index forgets unlabelled transactions.
    """

    def __init__(self, ttl_ms: int) -> None:
        self.ttl_ms = ttl_ms
        self.vectors: OrderedDict[str, tuple[int, tuple[float, ...]]] = OrderedDict()
        self.watermark = -(2**62)

    def hold(self, v: FeatureVector) -> None:
        self.vectors[v.txn.txn_id] = (v.txn.ts_ms, tuple(v.values))
        if v.txn.ts_ms > self.watermark:
            self.watermark = v.txn.ts_ms
        oldest = self.watermark - self.ttl_ms
        while self.vectors:
            txn_id, (ts, _) = next(iter(self.vectors.items()))
            if ts >= oldest:
                break
            del self.vectors[txn_id]

    def join(self, label: LabelEvent) -> LabelledVector | None:
        seen = self.vectors.pop(label.txn_id, None)
        if seen is None:
            return None
        return LabelledVector(label.txn_id, label.is_fraud, seen[1], label.seq, label.ts_ms)
