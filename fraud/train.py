"""Offline training and evaluation, through the same feature engine and scorer the flow uses.

The protocol is what production would have seen (README, "Models", says why):

- Periods are whole UTC days counted from the day of the first transaction: training
  `[start, start + train)`, a gap of the label delay, validation, then test.
- Training uses a transaction only if its label had arrived by the end of the training period: a
  model trained then knows nothing of the later labels, and a transaction whose label came later
  is unknown, not genuine.
- The gap keeps validation away from the transactions still waiting for their labels at training
  time. Validation picks the XGBoost parameters (`models.xgb.SEARCH_GRID`, each early-stopped)
  and the alert threshold (best F1).
- Validation and test are judged on every labelled transaction, except those of cards already
  known to be compromised (a fraud label on the card had arrived before that day): those are
  blocked already, and counting them would reward remembering rather than detecting.
- Reported: ROC AUC, average precision, Card Precision@k per day, precision and recall at the
  threshold.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from features.engine import FeatureEngine, FeaturePipeline, FeatureVector, LabelEvent
from features.event_files import replay
from fraud.dataset import DAY_MS, NO_LABEL, Dataset, build_dataset, read_labels, read_patterns
from models import drift, evaluation
from models.artifact import ModelArtifact, make_version, save
from models.serving import Decision, LabelledVector, PendingVectors, Scorer
from models.xgb import DEFAULT_PARAMS, SEARCH_GRID, XGBScorer, positive_weight, tune_xgb
from service.runtime import new_scorer
from service.settings import Settings


@dataclass(frozen=True)
class Split:
    """Training, gap, validation and test periods, in days from the first transaction's day."""

    train_days: float = 38
    valid_days: float = 10
    test_days: float = 10
    gap_days: float = 7
    start_day: float = 0

    @property
    def train(self) -> tuple[float, float]:
        return self.start_day, self.start_day + self.train_days

    @property
    def valid(self) -> tuple[float, float]:
        start = self.train[1] + self.gap_days
        return start, start + self.valid_days

    @property
    def test(self) -> tuple[float, float]:
        return self.valid[1], self.valid[1] + self.test_days


def parse_when(text: str) -> int:
    """Epoch milliseconds of a calendar bound: a date (`2026-02-01`, midnight UTC), an RFC 3339
    time with an offset (`2026-02-01T06:00:00+01:00`), or epoch milliseconds."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date, an RFC 3339 time or epoch milliseconds") from None
    if len(text) <= 10:  # a date alone: midnight UTC
        when = when.replace(tzinfo=UTC)
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset (write Z or +00:00, or give a date alone)")
    return round(when.timestamp() * 1000)


@dataclass(frozen=True)
class Calendar:
    """The periods as calendar bounds (epoch ms): training from `train_from_ms` (None: the first
    transaction's day) to `train_to_ms`, the gap, validation to `valid_to_ms`, test to
    `test_to_ms`. `split` turns them into the `Split` of a dataset (fractional days from its first
    day), refusing bounds out of order."""

    train_to_ms: int
    valid_to_ms: int
    test_to_ms: int
    train_from_ms: int | None = None
    gap_days: float = 7

    def split(self, day0_ms: int) -> Split:
        def day(ms: int) -> float:
            return (ms - day0_ms) / DAY_MS

        start = day(self.train_from_ms) if self.train_from_ms is not None else 0.0
        valid_from = day(self.train_to_ms) + self.gap_days
        s = Split(
            train_days=day(self.train_to_ms) - start,
            valid_days=day(self.valid_to_ms) - valid_from,
            test_days=day(self.test_to_ms) - day(self.valid_to_ms),
            gap_days=self.gap_days,
            start_day=start,
        )
        for name, days in (("training", s.train_days), ("validation", s.valid_days), ("test", s.test_days)):
            if days <= 0:
                raise ValueError(
                    f"the {name} period is empty ({days:g} days): the bounds must follow each other "
                    f"(train from < train to, train to + {self.gap_days:g} gap days < valid to < test to)"
                )
        return s


def boundaries(data: Dataset, split: Split) -> dict[str, list[str]]:
    """The exact bounds of each period, as RFC 3339 UTC times (what the report prints)."""

    def at(day: float) -> str:
        ms = data.day0_ms + round(day * DAY_MS)
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")

    return {
        name: [at(a), at(b)]
        for name, (a, b) in (("train", split.train), ("validation", split.valid), ("test", split.test))
    }


def judge(data: Dataset, rows: np.ndarray, scores: np.ndarray, threshold: float, k: int) -> dict[str, Any]:
    """AUC, AP, Card Precision@k per day, precision and recall at `threshold` on `rows`."""
    y = data.y[rows]
    report = evaluation.evaluate(y, scores, threshold)
    report["card_precision_at_k"] = evaluation.card_precision_at_k(
        data.day[rows], data.cards[rows], y, scores, k
    )
    report["k"] = k
    return report


def label_delays(data: Dataset, split: Split) -> dict[str, float]:
    """How long the fraud labels of the training period took: what a label-risk window's shift
    (`features.catalog.LABEL_DELAY`) and the gap should be measured against."""
    fraud = data.period(*split.train) & (data.y == 1) & (data.label_ts != NO_LABEL)
    days = (data.label_ts[fraud] - data.ts_ms[fraud]) / DAY_MS
    if not days.size:
        return {}
    return {
        "p50": float(np.quantile(days, 0.5)),
        "p90": float(np.quantile(days, 0.9)),
        "share_within_gap": float((days <= split.gap_days).mean()),
    }


MIN_REFERENCE_ROWS = 1000  # fewer settled training rows than this: the reference uses them all
MAX_REFERENCE_ROWS = 100_000  # more: an even sample of them (bin shares within ~0.1 % of all)


def reference_rows(rows: np.ndarray) -> np.ndarray:
    """The rows (of mask `rows`) the drift reference is computed on: all of them up to
    `MAX_REFERENCE_ROWS`, else that many spread evenly over them (every day of the period keeps
    its share)."""
    idx = np.flatnonzero(rows)
    if idx.size <= MAX_REFERENCE_ROWS:
        return idx
    return idx[np.linspace(0, idx.size - 1, MAX_REFERENCE_ROWS).round().astype(np.int64)]


@dataclass
class Fitted:
    booster: Any
    params: dict[str, Any]
    threshold: float
    report: dict[str, Any]
    reference: dict[str, Any] | None = None  # `models.drift.Reference` of the training rows


def fit(
    data: Dataset,
    names: list[str],
    split: Split,
    *,
    k: int = 100,
    search: bool = True,
    device: str = "cpu",
    seed: int = 0,
    lookback_days: float = 0.0,
) -> Fitted:
    """Train on `split.train`, tune and pick the threshold on `split.valid`, judge `split.test`."""
    tr = data.training_rows(*split.train)
    va = data.evaluation_rows(*split.valid)
    te = data.evaluation_rows(*split.test)
    for name, m in (("training", tr), ("validation", va), ("test", te)):
        if not (data.y[m] == 1).any():
            raise ValueError(
                f"the {name} period has no fraud labels (periods {split}); move or widen it "
                "(see `fraud train --help`)"
            )
    eval_set = (data.X[va], data.y[va])
    grid = SEARCH_GRID if search else ({},)
    booster, params, log = tune_xgb(
        data.X, data.y, names, eval_set, grid=grid, device=device, seed=seed, rows=tr
    )  # the training rows are read in chunks, never copied whole
    scorer = XGBScorer(booster, names, device=device, nthread=0, positive_weight=positive_weight(params))
    valid_scores = scorer.score(eval_set[0])
    # Drift is measured against training rows whose look-back windows were full: the first
    # `lookback_days` of a file see a shorter history than any later day would.
    settled = tr & data.period(split.train[0] + lookback_days, split.train[1])
    ref_rows = reference_rows(settled if settled.sum() >= MIN_REFERENCE_ROWS else tr)
    ref_X = data.X[ref_rows]
    reference = drift.reference_of(ref_X, names, scorer.score(ref_X)).to_json()
    del ref_X
    threshold = evaluation.best_f1_threshold(data.y[va], valid_scores)
    report = {
        "periods_days": {"train": split.train, "validation": split.valid, "test": split.test},
        "train": {"rows": int(tr.sum()), "frauds": int((data.y[tr] == 1).sum())},
        "fraud_label_delay_days": label_delays(data, split),
        "validation": judge(data, va, valid_scores, threshold, k),
        "test": judge(data, te, scorer.score(data.X[te]), threshold, k),
        "search": log,
    }
    return Fitted(booster, {**DEFAULT_PARAMS, **params}, threshold, report, reference)


def train(
    settings: Settings,
    pipeline: FeaturePipeline,
    transactions: Path,
    labels: Path,
    out_dir: Path,
    *,
    split: Split | Calendar,
    k: int = 100,
    search: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the dataset, fit (see `fit`), save the artifact; return the report."""
    data = build_dataset(pipeline, transactions, labels, label_ttl_days=settings.label_ttl_days)
    return train_on(
        settings,
        pipeline,
        data,
        out_dir,
        source=transactions.name,
        split=split,
        k=k,
        search=search,
        seed=seed,
    )


def train_on(
    settings: Settings,
    pipeline: FeaturePipeline,
    data: Dataset,
    out_dir: Path,
    *,
    source: str,
    split: Split | Calendar,
    k: int = 100,
    search: bool = True,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit on `data` (see `fit`), save the artifact to `out_dir`; return the report (`version`,
    `threshold`, then the artifact's metrics: the fit's report with `source`, the feature set,
    the exact period bounds and any `extra` entries). Calendar bounds are resolved against the
    data's first day here."""
    if isinstance(split, Calendar):
        split = split.split(data.day0_ms)
    lookback_days = max(plan.lookback_ms for plan in pipeline.plans) / DAY_MS
    fitted = fit(
        data, list(pipeline.names), split, k=k, search=search, device=settings.xgb_device, seed=seed,
        lookback_days=lookback_days,
    )  # fmt: skip
    report = {
        **fitted.report,
        "periods": boundaries(data, split),
        "source": source,
        "feature_set": settings.feature_set,
        **(extra or {}),
    }
    now = datetime.now(UTC)
    artifact = ModelArtifact(
        version=make_version(pipeline.schema_hash, now),
        feature_names=list(pipeline.names),
        schema_hash=pipeline.schema_hash,
        threshold=float(fitted.threshold),
        metrics=report,
        trained_at=now.isoformat(timespec="seconds"),
        params={**fitted.params, "seed": seed, "best_iteration": fitted.booster.num_boosted_rounds()},
        booster=fitted.booster,
        reference=fitted.reference,
    )
    save(artifact, out_dir)
    return {"version": artifact.version, "threshold": artifact.threshold, **report}


def scored_batches(
    scorer: Scorer,
    pipeline: FeaturePipeline,
    transactions: Path,
    labels: Path | None,
    label_ttl_days: float,
    batch: int = 256,
) -> Iterator[list[Decision]]:
    """Replay the files through the serving `scorer` as the flow does (each label joined to the
    vector its transaction was scored with, River learning it when it arrives): the decisions of
    each batch of `batch` items; `scorer.last` holds that batch's stats (failures, drift events)."""
    waiting = PendingVectors(round(label_ttl_days * DAY_MS))
    items: list[FeatureVector | LabelledVector] = []
    for out in FeatureEngine(pipeline).run(replay(transactions, labels)):
        if isinstance(out, FeatureVector):
            waiting.hold(out)
            items.append(out)
        elif isinstance(out, LabelEvent) and (learned := waiting.join(out)) is not None:
            items.append(learned)
        if len(items) >= batch:
            yield scorer.decide(items)
            items.clear()
    yield scorer.decide(items)


def evaluate(
    settings: Settings,
    pipeline: FeaturePipeline,
    artifact: ModelArtifact,
    transactions: Path,
    labels: Path,
    periods: list[tuple[str, float, float]],
    *,
    k: int = 100,
    batch: int = 256,
) -> dict[str, Any]:
    """Replay through the serving scorer (the online model learning from labels as they arrive);
    judge XGBoost alone and the combined score per period, with the training protocol's rules."""
    known = read_labels(labels)
    patterns = read_patterns(transactions)
    scorer = new_scorer(settings, artifact)
    rows: list[tuple[str, int, str, float, float]] = []
    for decisions in scored_batches(scorer, pipeline, transactions, labels, settings.label_ttl_days, batch):
        if scorer.last.failed:  # an evaluation that left transactions out would misreport quality
            item, exc = scorer.last.failed[0]
            raise RuntimeError(f"scoring failed on {item!r:.200}: {type(exc).__name__}: {exc}") from exc
        rows += [(d.txn.txn_id, d.txn.ts_ms, d.txn.card_id, d.xgb, d.score) for d in decisions]
    ids = [r[0] for r in rows]
    data = Dataset.of(np.empty((len(rows), 0)), [r[1] for r in rows], ids, [r[2] for r in rows], known)
    scores = {"xgboost": np.array([r[3] for r in rows]), "combined": np.array([r[4] for r in rows])}
    threshold = scorer.threshold
    result: dict[str, Any] = {"threshold": threshold, "online_weight": scorer.weight, "periods": {}}
    pattern_of = np.array([patterns.get(i, "") for i in ids])
    for name, start, end in periods:
        m = data.evaluation_rows(start, end)
        per: dict[str, Any] = {"days": [start, end]}
        for model, s in scores.items():
            per[model] = judge(data, m, s[m], threshold, k)
            per[model]["caught_by_pattern"] = {
                p: f"{int((s[pm] >= threshold).sum())}/{int(pm.sum())}"
                for p in sorted(set(patterns.values()))
                if (pm := m & (pattern_of == p)).any()
            }
        result["periods"][name] = per
    result["online_labels_learned"] = scorer.online.n_learned
    return result
