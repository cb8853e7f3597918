"""Serving: turn feature vectors into decisions with both models, and learn from joined labels.

One `Scorer` serves the flow (one Bytewax step) and the offline evaluation of `fraud evaluate`,
so the score a transaction gets in a replay is the score it gets in production. XGBoost scores
each batch in one vectorised call; the online model predicts and learns one event at a time, in
arrival order, so a label teaches it only about transactions that come after it.
"""

from __future__ import annotations

import math
import pickle
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from features.engine import FeatureVector, LabelEvent
from features.events import Control, Transaction
from features.table import vector_bytes
from models.artifact import ArtifactError, ModelArtifact
from models.combine import combine
from models.drift import DriftEvent, DriftMonitor
from models.online import OnlineModel
from models.registry import Registry
from models.rules import Hit, RuleSet
from models.rules import decide as rule_decision
from models.rules import digest as rules_digest
from models.xgb import XGBScorer, positive_weight

Reason = tuple[str, float, float]  # (feature, value, contribution in log-odds)


@dataclass(frozen=True)
class ShadowScore:
    """What the shadow model said of a transaction (never alerts; goes to the decision log)."""

    version: str
    xgb: float
    score: float  # combined with the same online score as the champion's
    alert: bool  # whether it would have alerted at its own threshold


@dataclass
class Decision:
    """A scored transaction: component scores, final score, and why when it alerts; which model
    version decided it and at which threshold; the shadow model's scores when one runs."""

    txn: Transaction
    values: list[float]
    xgb: float
    online: float
    score: float
    alert: bool
    late: bool
    latency_s: float | None
    reasons: list[Reason] = field(default_factory=list)
    version: str = ""
    threshold: float = math.nan
    shadow: ShadowScore | None = None
    action: str = ""  # alert, review, allow (a rule suppressed the model's alert) or none
    hits: list[Hit] = field(default_factory=list)  # the rules that matched (dry-run ones too)


class Served:
    """A model the scorer serves (champion or shadow): its artifact, XGBoost scorer, threshold."""

    def __init__(self, artifact: ModelArtifact, xgb: XGBScorer, threshold: float, digest: str) -> None:
        self.artifact, self.xgb, self.threshold, self.digest = artifact, xgb, threshold, digest

    @property
    def version(self) -> str:
        return self.artifact.version


class LabelledVector(msgspec.Struct, frozen=True, gc=False):
    """A label joined to the feature values its transaction was scored with: what the online
    model learns. The flow keeps the values per transaction (in `pending`) and sends this.

    The values are kept as float32 (an `array("f")`), by the flow and by `PendingVectors` alike:
    what XGBoost scores and trains on, and half the memory of a transaction waiting weeks for
    its label.
    """

    txn_id: str
    is_fraud: bool
    values: Sequence[float]
    seq: int = 0
    ts_ms: int = 0  # the label's event time (drift events say when)


Item = FeatureVector | LabelledVector | Control


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
    applied: list[Control] = field(default_factory=list)  # commands applied in this batch (logged)


class Scorer:
    """XGBoost + River behind one `decide(items)` call; holds the online model's state, the model
    it serves (champion) and the one it shadows, if any."""

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
        monitor_for: Callable[[ModelArtifact], DriftMonitor | None] | None = None,
        registry: Registry | None = None,
        digest: str = "",
    ) -> None:
        self.device, self.nthread = device, nthread
        self.fixed_threshold = threshold  # FRAUD_THRESHOLD: every model alerts at it; else its own
        self.registry = registry  # where the versions a command names are loaded from
        self.monitor_for = monitor_for  # the drift watch of a newly served champion
        self.monitor = monitor
        self.names = list(artifact.feature_names)
        self.online = online
        self.weight = online_weight
        self.batch_size = batch_size
        self.top_reasons = top_reasons
        self.shadow: Served | None = None
        self.rules: RuleSet | None = None
        self._serve(self._served(artifact, digest))
        self.last = BatchStats()

    # --- the models served -------------------------------------------------------------------

    def _served(self, artifact: ModelArtifact, digest: str) -> Served:
        xgb = XGBScorer(
            artifact.booster,
            self.names,
            device=self.device,
            nthread=self.nthread,
            positive_weight=positive_weight(artifact.params),
        )
        threshold = artifact.threshold if self.fixed_threshold is None else self.fixed_threshold
        return Served(artifact, xgb, threshold, digest)

    def _serve(self, champion: Served) -> None:
        self.champion = champion
        self.artifact, self.xgb, self.threshold = champion.artifact, champion.xgb, champion.threshold

    def _load(self, version: str, digest: str) -> ModelArtifact:
        """Version `version` from the registry, refused unless its model file has `digest` and it
        was trained on the feature schema this scorer serves."""
        if self.registry is None:
            raise ArtifactError(f"model {version} was named, but this scorer has no registry")
        artifact = self.registry.load(version, digest)
        if artifact.schema_hash != self.champion.artifact.schema_hash or artifact.feature_names != self.names:
            raise ArtifactError(
                f"model {version} was trained on feature schema {artifact.schema_hash[:12]}, the flow "
                f"computes {self.champion.artifact.schema_hash[:12]}"
            )
        return artifact

    def apply(self, command: Control) -> None:
        """Apply an operator's command: serve another champion (its drift watch starts afresh,
        against its own reference), shadow a model or stop shadowing, replace the rule set (an
        empty text removes it). Raises (`ArtifactError`, `RuleError`, `ValueError`) when it
        cannot, and then serves exactly what it served before."""
        if command.command == "champion":
            champion = self._served(self._load(command.version, command.digest), command.digest)
            monitor = self.monitor_for(champion.artifact) if self.monitor_for is not None else self.monitor
            self._serve(champion)
            self.monitor = monitor
        elif command.command == "shadow":
            self.shadow = (
                self._served(self._load(command.version, command.digest), command.digest)
                if command.version
                else None
            )
        elif command.command == "rules":
            if rules_digest(command.text) != command.digest:
                raise ValueError("the rule text does not match the digest its command names")
            rules = RuleSet.parse(command.text, self.names, source=command.version or "rules")
            self.rules = rules if len(rules) else None
        else:
            raise ValueError(f"the scorer has no command {command.command!r}")

    # --- deciding ----------------------------------------------------------------------------

    def decide(self, items: Sequence[Item]) -> list[Decision]:
        """Decisions for the feature vectors in `items`; labelled vectors among them train the online
        model, in order, so a label teaches it only about the transactions after it; commands
        (`Control`) take effect at their place: the items before one are decided as before it.

        Never raises on account of one item: an item that makes a model raise is left out and
        listed in `self.last.failed` with its exception (the flow dead-letters it), and the rest
        of the batch is decided as if it were not there. A batch XGBoost call that fails is
        retried row by row, so only the offending rows are left out.
        """
        stats = self.last = BatchStats()
        out: list[Decision] = []
        start = 0
        for i, it in enumerate(items):
            if type(it) is Control:
                out += self._decide(items[start:i], stats)
                start = i + 1
                try:
                    self.apply(it)
                    stats.applied.append(it)
                except Exception as exc:  # the command is refused; the models stay as they were
                    stats.failed.append((it, exc))
        out += self._decide(items[start:] if start else items, stats)
        return out

    def _decide(self, items: Sequence[Item], stats: BatchStats) -> list[Decision]:
        if not items:
            return []
        vectors = [it for it in items if isinstance(it, FeatureVector)]
        concept = self.monitor.concept if self.monitor is not None else None
        labelled = [it.values for it in items if type(it) is LabelledVector] if concept is not None else []
        xgb_scores, X, label_xgb = self._xgb_scores(vectors, labelled, stats)
        shadow, shadow_scores = self.shadow, None
        if shadow is not None and X is not None and len(X):
            try:
                shadow_scores = self._score_matrix(X, shadow.xgb)
            except Exception:  # the shadow never costs the champion a decision
                shadow_scores = None
        skip = {id(it) for it, _ in stats.failed}
        decisions: list[Decision] = []
        decided: list[int] = []  # the row of `X` of each decision
        champion, rules = self.champion, self.rules
        version, threshold = champion.version, champion.threshold
        xgb_list, label_list = xgb_scores.tolist(), label_xgb.tolist()  # floats, not numpy scalars
        # Per item, the loop reads these once (the same objects the attributes hold; `predict`
        # returns 0.0 while the model is not ready, which a label in this batch may change).
        names, weight, learn, predict = (
            self.names,
            self.weight,
            self.online.learn_values,
            self.online.predict_values,
        )
        clock, learned, learn_s = time.perf_counter, 0, 0.0
        j = k = 0
        for it in items:
            try:
                if isinstance(it, LabelledVector):
                    started = clock()
                    river = learn(names, it.values, it.is_fraud)
                    learn_s += clock() - started
                    learned += 1
                    if concept is not None:
                        xs, k = label_list[k], k + 1
                        final = float(combine(xs, river, weight))
                        stats.events += concept.observe(it.is_fraud, xs, river, final, it.ts_ms)
                    continue
                if not isinstance(it, FeatureVector):
                    continue
                xs = xgb_list[j]
                j += 1
                if skip and id(it) in skip:
                    continue
                online = predict(names, it.values)
                final = float(combine(xs, online, weight))
                alert = final >= threshold
                d = Decision(
                    it.txn, it.values, xs, online, final, alert, it.late, None,
                    version=version, threshold=threshold, action="alert" if alert else "none",
                )  # fmt: skip
                if rules is not None:
                    d.hits = rules.evaluate(it.txn, it.values)
                    if d.hits:
                        d.alert, d.action = rule_decision(alert, d.hits)
                if shadow_scores is not None and shadow is not None:
                    sx = float(shadow_scores[j - 1])
                    sf = float(combine(sx, online, self.weight))
                    d.shadow = ShadowScore(shadow.version, sx, sf, sf >= shadow.threshold)
                decisions.append(d)
                decided.append(j - 1)
            except Exception as exc:  # one poisoned item must not cost the batch its decisions
                stats.failed.append((it, exc))
        stats.labels_learned += learned
        stats.learn_s += learn_s
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
            X = _packed_matrix(vectors, labelled, len(self.names))
            if X is None:
                X = np.asarray([v.values for v in vectors] + labelled, dtype=np.float32)
            both = self._score_matrix(X, self.xgb)
            scores, label_scores = both[: len(vectors)], both[len(vectors) :]
        except Exception:
            scores = self._xgb_row_by_row(vectors, stats)
            label_scores = np.full(len(labelled), np.nan)
        stats.rows += len(vectors)
        return scores, (X[: len(vectors)] if X is not None else None), label_scores

    def _score_matrix(self, X: np.ndarray, xgb: XGBScorer) -> np.ndarray:
        """One XGBoost call per `batch_size` rows of `X`."""
        return np.concatenate(
            [xgb.score(X[s : s + self.batch_size]) for s in range(0, len(X), self.batch_size)]
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

    # --- state -------------------------------------------------------------------------------

    def snapshot(self) -> tuple[Any, ...]:
        """Immutable copy: the online model and the drift watch as bytes, the versions (with
        their model digests) served and shadowed, and the rule set's text and name; the scorer
        keeps nothing per transaction."""
        shadow, rules = self.shadow, self.rules
        return (
            pickle.dumps(self.online),
            pickle.dumps(self.monitor),
            self.champion.version,
            self.champion.digest,
            shadow.version if shadow is not None else "",
            shadow.digest if shadow is not None else "",
            rules.text if rules is not None else "",
            rules.source if rules is not None else "",
        )

    def restore(self, snap: tuple[Any, ...]) -> None:
        """Resume the online model and the models served and shadowed (loaded from the registry
        when the snapshot served another version than this scorer starts with: raises
        `ArtifactError` when it cannot); then the drift watch, when the snapshot's was built like
        the resumed champion's (the same reference and settings); otherwise the watch starts
        afresh, and it stays off when this scorer has none."""
        self.online = pickle.loads(snap[0])
        if len(snap) >= 6:
            version, digest, shadow_version, shadow_digest = snap[2:6]
            if version != self.champion.version or (digest and digest != self.champion.digest):
                self.apply(Control("champion", version, digest))
            self.shadow = None
            if shadow_version:
                self.apply(Control("shadow", shadow_version, shadow_digest))
        if len(snap) >= 8:
            text, source = snap[6:8]
            self.rules = RuleSet.parse(text, self.names, source=source) if text else None
        watch = pickle.loads(snap[1]) if len(snap) > 1 else None
        if self.monitor is not None and watch is not None and watch.config == self.monitor.config:
            self.monitor = watch


def _packed_matrix(
    vectors: list[FeatureVector], labelled: list[Sequence[float]], width: int
) -> np.ndarray | None:
    """The float32 matrix of `vectors` then `labelled`, from the copies the flow's `pending` step
    packed (`FeatureVector.packed`) and the labelled vectors' float32 arrays: their bytes joined,
    no value converted again. The same matrix `np.asarray(..., dtype=np.float32)` gives (packing
    keeps float32 values exactly). None when a row has no such copy or is not `width` values wide:
    the caller converts the values then, and refuses what does not convert."""
    size = 4 * width
    rows: list[bytes | array[float]] = []
    for v in vectors:
        if v.packed is None:
            return None
        try:
            row = vector_bytes(v.packed)
        except ValueError:  # not a packed vector
            return None
        if len(row) != size:
            return None
        rows.append(row)
    for values in labelled:
        if type(values) is not array or values.typecode != "f" or len(values) != width:
            return None
        rows.append(values)
    return np.frombuffer(b"".join(rows), dtype=np.float32).reshape(len(rows), width)


class PendingVectors:
    """Scored feature vectors waiting for their labels, for batch replays (`fraud evaluate`); the
    flow keeps them in the shards of its `pending` step instead.

    `hold` each vector as it is scored, `join` each label into the `LabelledVector` the online
    model learns (None when its vector is not held). Vectors older than `ttl_ms` of event time
    behind the newest are forgotten, as the flow's index forgets unlabelled transactions.
    """

    def __init__(self, ttl_ms: int) -> None:
        self.ttl_ms = ttl_ms
        self.vectors: OrderedDict[str, tuple[int, array[float]]] = OrderedDict()
        self.watermark = -(2**62)

    def hold(self, v: FeatureVector) -> None:
        self.vectors[v.txn.txn_id] = (v.txn.ts_ms, array("f", v.values))
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
