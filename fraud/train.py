"""Offline training and evaluation, through the same feature engine and scorer the flow uses.

`build_dataset` replays a transactions + labels file through `FeatureEngine` (labels merged in
event time, so label-based features only see labels that had arrived). `train` fits XGBoost on an
early time window, picks the threshold on the next, and reports on a later one. `evaluate`
replays a file through the serving `Scorer`, the online model learning as labels arrive, and
compares XGBoost alone with the combined score period by period.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np

from features.engine import FeatureEngine, FeatureVector, LabelEvent, Pipeline
from features.events import DeadLetter
from features.replay import open_text, replay
from fraud.runtime import new_scorer
from fraud.settings import Settings
from models import metrics
from models.artifact import ModelArtifact, make_version, save
from models.serving import LabelledVector, PendingVectors
from models.xgb import XGBScorer, train_xgb

DAY_MS = 86_400_000


class _Truth(msgspec.Struct):
    txn_id: str
    is_fraud: bool = False


class _Pattern(msgspec.Struct):
    txn_id: str
    pattern: str | None = None


_Row = TypeVar("_Row", _Truth, _Pattern)


@dataclass
class Dataset:
    """Feature vectors of a file's transactions, in arrival order, with their eventual label."""

    X: np.ndarray
    y: np.ndarray  # 1 fraud, 0 genuine, -1 no label in the file
    ts_ms: np.ndarray
    txn_ids: list[str]
    dead_letters: int

    def window(self, start_day: float, end_day: float) -> np.ndarray:
        """Mask of labelled rows in [start_day, end_day) counted from the first transaction."""
        t0 = self.ts_ms.min()
        return (self.ts_ms >= t0 + start_day * DAY_MS) & (self.ts_ms < t0 + end_day * DAY_MS) & (self.y >= 0)


def _records(path: Path, kind: type[_Row]) -> Iterator[_Row]:
    """The lines of a .jsonl(.gz) file decoded as `kind`; lines that do not decode are skipped
    (the flow dead-letters them; offline evaluation only needs the good ones)."""
    dec = msgspec.json.Decoder(kind)
    with open_text(path) as f:
        for line in f:
            try:
                yield dec.decode(line)
            except msgspec.DecodeError:
                continue


def read_truth(labels: Path | None) -> dict[str, bool]:
    """Every verdict in a labels file, whenever it arrived (for offline training only)."""
    return {} if labels is None else {t.txn_id: t.is_fraud for t in _records(labels, _Truth)}


def read_patterns(transactions: Path) -> dict[str, str]:
    """The generator's ground-truth `pattern` of each fraud transaction (not part of the contract)."""
    return {p.txn_id: p.pattern for p in _records(transactions, _Pattern) if p.pattern}


def build_dataset(pipeline: Pipeline, transactions: Path, labels: Path | None) -> Dataset:
    truth = read_truth(labels)
    engine = FeatureEngine(pipeline)
    rows: list[list[float]] = []
    ts: list[int] = []
    ids: list[str] = []
    dead = 0
    for out in engine.run(replay(transactions, labels)):
        if isinstance(out, FeatureVector):
            rows.append(out.values)
            ts.append(out.txn.ts_ms)
            ids.append(out.txn.txn_id)
        elif isinstance(out, DeadLetter):
            dead += 1
    y = np.array([{True: 1, False: 0}.get(truth.get(i), -1) for i in ids], dtype=np.int8)  # type: ignore[arg-type]
    X = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(pipeline.names))
    return Dataset(X, y, np.asarray(ts, dtype=np.int64), ids, dead)


def train(
    settings: Settings,
    pipeline: Pipeline,
    transactions: Path,
    labels: Path,
    out_dir: Path,
    *,
    train_days: float,
    valid_days: float,
    test_days: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit, choose the threshold (best F1 on the validation window), evaluate, save the artifact."""
    data = build_dataset(pipeline, transactions, labels)
    tr = data.window(0, train_days)
    va = data.window(train_days, train_days + valid_days)
    te = data.window(train_days + valid_days, train_days + valid_days + test_days)
    for name, m in (("train", tr), ("validation", va), ("test", te)):
        if data.y[m].sum() == 0:
            raise ValueError(f"the {name} window has no fraud labels; widen it (see `fraud train --help`)")
    booster = train_xgb(
        data.X[tr],
        data.y[tr],
        pipeline.names,
        device=settings.xgb_device,
        seed=seed,
        eval_set=(data.X[va], data.y[va]),
    )
    scorer = XGBScorer(booster, pipeline.names, device=settings.xgb_device, nthread=0)
    threshold = metrics.best_f1_threshold(data.y[va], scorer.score(data.X[va]))
    report = {
        "train": {"days": train_days, "rows": int(tr.sum()), "frauds": int(data.y[tr].sum())},
        "validation": metrics.evaluate(data.y[va], scorer.score(data.X[va]), threshold),
        "test": metrics.evaluate(data.y[te], scorer.score(data.X[te]), threshold),
        "windows_days": [train_days, valid_days, test_days],
        "source": transactions.name,
    }
    now = datetime.now(UTC)
    artifact = ModelArtifact(
        version=make_version(pipeline.schema_hash, now),
        feature_names=list(pipeline.names),
        schema_hash=pipeline.schema_hash,
        threshold=float(threshold),
        metrics=report,
        trained_at=now.isoformat(timespec="seconds"),
        params={"tree_method": "hist", "seed": seed, "best_iteration": booster.num_boosted_rounds()},
        booster=booster,
    )
    save(artifact, out_dir)
    return {"version": artifact.version, "threshold": threshold, **report}


def evaluate(
    settings: Settings,
    pipeline: Pipeline,
    artifact: ModelArtifact,
    transactions: Path,
    labels: Path,
    periods: list[tuple[str, float, float]],
    batch: int = 256,
) -> dict[str, Any]:
    """Replay through the serving scorer (online model learning from labels as they arrive)."""
    truth = read_truth(labels)
    patterns = read_patterns(transactions)
    engine = FeatureEngine(pipeline)
    scorer = new_scorer(settings, artifact)
    waiting = PendingVectors(round(settings.label_ttl_days * 86_400_000))
    rows: list[tuple[str, int, float, float]] = []
    items: list[FeatureVector | LabelledVector] = []

    def flush() -> None:
        for d in scorer.process(items):
            rows.append((d.txn.txn_id, d.txn.ts_ms, d.xgb, d.score))
        items.clear()

    for out in engine.run(replay(transactions, labels)):
        if isinstance(out, FeatureVector):
            waiting.hold(out)
            items.append(out)
        elif isinstance(out, LabelEvent) and (learned := waiting.join(out)) is not None:
            items.append(learned)
        if len(items) >= batch:
            flush()
    flush()
    ids = [r[0] for r in rows]
    ts = np.array([r[1] for r in rows], dtype=np.int64)
    y = np.array([int(truth.get(i, False)) for i in ids], dtype=np.int8)
    known = np.array([i in truth for i in ids])
    xgb_s = np.array([r[2] for r in rows])
    final_s = np.array([r[3] for r in rows])
    threshold = scorer.threshold
    t0 = ts.min()
    result: dict[str, Any] = {"threshold": threshold, "online_weight": scorer.weight, "periods": {}}
    for name, start, end in periods:
        m = known & (ts >= t0 + start * DAY_MS) & (ts < t0 + end * DAY_MS)
        per: dict[str, Any] = {"days": [start, end]}
        for model, s in (("xgboost", xgb_s), ("combined", final_s)):
            per[model] = metrics.evaluate(y[m], s[m], threshold)
            caught: dict[str, str] = {}
            for pattern in sorted(set(patterns.values())):
                pm = m & np.array([patterns.get(i) == pattern for i in ids])
                if pm.any():
                    caught[pattern] = f"{int((s[pm] >= threshold).sum())}/{int(pm.sum())}"
            per[model]["caught_by_pattern"] = caught
        result["periods"][name] = per
    result["online_labels_learned"] = scorer.online.n_learned
    return result
