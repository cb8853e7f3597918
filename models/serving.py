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
from models.online import OnlineModel, x_dict
from models.xgb import XGBScorer

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


@dataclass
class BatchStats:
    rows: int = 0
    labels_learned: int = 0


class Scorer:
    """XGBoost + River behind one `process(items)` call; holds the online model's state."""

    def __init__(
        self,
        artifact: ModelArtifact,
        online: OnlineModel,
        *,
        threshold: float | None = None,
        online_weight: float = 0.5,
        batch_size: int = 256,
        top_reasons: int = 3,
        label_ttl_ms: int = 60 * 86_400_000,
        device: str = "cpu",
        nthread: int = 1,
        remember: bool = True,
    ) -> None:
        """`remember`: keep each scored vector until its `LabelEvent` arrives (batch replays). The
        flow passes False: there a keyed step per transaction keeps the vector and sends a
        `LabelledVector`, so this object (one Bytewax key, snapshotted every epoch) stays small."""
        self.artifact = artifact
        self.names = list(artifact.feature_names)
        self.xgb = XGBScorer(artifact.booster, self.names, device=device, nthread=nthread)
        self.online = online
        self.threshold = artifact.threshold if threshold is None else threshold
        self.weight = online_weight
        self.batch_size = batch_size
        self.top_reasons = top_reasons
        self.label_ttl_ms = label_ttl_ms
        self.remember = remember
        self.pending: OrderedDict[str, tuple[int, tuple[float, ...]]] = OrderedDict()
        self.watermark = -(2**62)
        self.last = BatchStats()

    def process(self, items: Sequence[FeatureVector | LabelEvent | LabelledVector]) -> list[Decision]:
        """Decisions for the feature vectors in `items`; labels among them train the online model."""
        stats = self.last = BatchStats()
        vectors = [it for it in items if isinstance(it, FeatureVector)]
        xgb_scores = self._xgb_scores(vectors, stats)
        decisions: list[Decision] = []
        j = 0
        for it in items:
            if isinstance(it, LabelEvent):
                seen = self.pending.pop(it.txn_id, None)
                if seen is not None:
                    self.online.learn_one(x_dict(self.names, seen[1]), it.is_fraud)
                    stats.labels_learned += 1
                continue
            if isinstance(it, LabelledVector):
                self.online.learn_one(x_dict(self.names, it.values), it.is_fraud)
                stats.labels_learned += 1
                continue
            online = (
                self.online.predict_proba_one(x_dict(self.names, it.values)) if self.online.ready else 0.0
            )
            xs = float(xgb_scores[j])
            j += 1
            final = float(combine(xs, online, self.weight))
            decisions.append(
                Decision(it.txn, it.values, xs, online, final, final >= self.threshold, it.late, None)
            )
            if self.remember:
                self._remember(it)
        self._explain([d for d in decisions if d.alert])
        now = time.time_ns()
        for d in decisions:
            if d.txn.received_ns:
                d.latency_s = (now - d.txn.received_ns) / 1e9
        return decisions

    def _xgb_scores(self, vectors: list[FeatureVector], stats: BatchStats) -> np.ndarray:
        if not vectors:
            return np.empty(0)
        X = np.asarray([v.values for v in vectors], dtype=np.float32)
        parts = []
        for start in range(0, len(vectors), self.batch_size):
            parts.append(self.xgb.score(X[start : start + self.batch_size]))
        stats.rows = len(vectors)
        return np.concatenate(parts)

    def _explain(self, alerts: list[Decision]) -> None:
        """Top positive XGBoost contributions of each alert: one `pred_contribs` call per batch."""
        if alerts and self.top_reasons:
            X = np.asarray([d.values for d in alerts], dtype=np.float32)
            for d, reasons in zip(alerts, self.xgb.contributions(X, self.top_reasons), strict=True):
                d.reasons = reasons

    def _remember(self, v: FeatureVector) -> None:
        """Keep the scored features until the label arrives, for `label_ttl_ms` of event time."""
        self.pending[v.txn.txn_id] = (v.txn.ts_ms, tuple(v.values))
        if v.txn.ts_ms > self.watermark:
            self.watermark = v.txn.ts_ms
        oldest = self.watermark - self.label_ttl_ms
        while self.pending:
            txn_id, (ts, _) = next(iter(self.pending.items()))
            if ts >= oldest:
                break
            del self.pending[txn_id]

    def snapshot(self) -> tuple[Any, ...]:
        """Immutable copy: the online model as bytes, pending entries (tuples) in a new list."""
        return (pickle.dumps(self.online), list(self.pending.items()), self.watermark)

    def restore(self, snap: tuple[Any, ...]) -> None:
        online, pending, self.watermark = snap
        self.online = pickle.loads(online)
        self.pending = OrderedDict(pending)
