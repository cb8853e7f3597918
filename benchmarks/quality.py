"""Detection quality on generated worlds: the project's default feature set against the textbook
baseline, both trained the same way (`fraud.train.fit`: labels as they had arrived, a gap of the
label delay, XGBoost tuned on validation), judged on the test week of each world.

    python -m benchmarks.quality [--seed 11] [--worlds textbook late-pattern ...] [--cards 4000]
                                 [--no-search] [--catalogs default textbook] [--k 100]

Prints one row per world and feature set (AUC, AP, Card Precision@k on the test week), the AP and
CP@k margins of the default over the textbook, and for the late-pattern world what the River online
model adds after the pattern starts (XGBoost alone vs combined, replayed through the serving
scorer). `--ablate NAME ...` also trains the default set without each named feature group
(`ABLATIONS`), to measure what a group earns.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import LATENESS_MS, parser
from features.catalog import CARD, CATALOGS, FEATURES, MERCHANT, default_features
from features.engine import FeaturePipeline
from features.spec import FeatureSet, WindowFeature
from fraud.datagen import write_files
from fraud.dataset import Dataset, build_dataset
from fraud.train import evaluate, fit
from fraud.worlds import SPLIT, WORLDS, World
from models.artifact import ModelArtifact
from service.settings import Settings


def _without(keep: Any) -> FeatureSet:
    return FeatureSet(windows=tuple(f for f in FEATURES.windows if keep(f)), txn=FEATURES.txn)


def _plus(*extra: WindowFeature, txn: tuple[str, ...] = ()) -> FeatureSet:
    return FeatureSet(windows=(*FEATURES.windows, *extra), txn=(*FEATURES.txn, *txn))


ABLATIONS: dict[str, Any] = {
    "delayed-risk": lambda: _without(lambda f: not f.label_delay),
    "merchant-delayed-risk": lambda: _without(lambda f: not (f.label_delay and f.entity.name == "merchant")),
    "card-device-risk": lambda: _without(lambda f: not (f.label_delay and f.entity.name != "merchant")),
    "card-ratios": lambda: _without(lambda f: f.agg != "ratio_to_mean"),
    "delay-7d": lambda: default_features("7d"),
    "delay-14d": lambda: default_features("14d"),
    "plus-unshifted-risk": lambda: _plus(
        WindowFeature(CARD, "label_count", window="30d"),
        WindowFeature(MERCHANT, "label_rate", window="30d"),
        WindowFeature(MERCHANT, "label_count", window="30d"),
    ),
    "plus-day-of-week": lambda: _plus(txn=("day_of_week",)),
    "plus-time-flags": lambda: _plus(txn=("is_weekend", "is_night")),
}
"""Variants of the default set: without a group of features (`--ablate card-ratios` trains the
default set less the amount ratios), with its label-risk windows shifted by another delay, or
with features it leaves out (`plus-…`)."""


def run_world(world: World, seed: int, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    out = workdir / world.name
    summary = write_files(out, world.config(seed, args.cards, args.merchants))
    txns, labels = out / "transactions.jsonl", out / "labels.jsonl"
    sets: dict[str, FeatureSet] = {name: CATALOGS[name] for name in args.catalogs}
    for name in args.ablate:
        sets[f"default -{name}"] = ABLATIONS[name]()
    rows = []
    for name, feature_set in sets.items():
        started = time.perf_counter()
        pipeline = FeaturePipeline(feature_set, LATENESS_MS)
        data = build_dataset(pipeline, txns, labels)
        fitted = fit(data, list(pipeline.names), SPLIT, k=args.k, search=args.search, seed=seed)
        test = fitted.report["test"]
        row: dict[str, Any] = {
            "world": world.name, "set": name, "features": len(pipeline.names),
            "auc": test["auc"], "ap": test["ap"], "cp": test["card_precision_at_k"],
            "frauds": test["positives"], "n": test["n"], "txns": summary["n_transactions"],
            "seconds": time.perf_counter() - started,
        }  # fmt: skip
        if name == "default" and world.late_pattern_day is not None:
            row["river"] = river_gain(world, pipeline, data, fitted, txns, labels, args.k)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def river_gain(
    world: World, pipeline: FeaturePipeline, data: Dataset, fitted: Any, txns: Path, labels: Path, k: int
) -> dict[str, Any]:
    """XGBoost alone and XGBoost + River from the late pattern's first day to the test's end."""
    artifact = ModelArtifact(
        version="quality", feature_names=list(pipeline.names), schema_hash=pipeline.schema_hash,
        threshold=fitted.threshold, metrics={}, trained_at=datetime.now(UTC).isoformat(), params=fitted.params,
        booster=fitted.booster,
    )  # fmt: skip
    start = float(world.late_pattern_day or 0)
    report = evaluate(Settings(), pipeline, artifact, txns, labels, [("after", start, SPLIT.test[1])], k=k)
    per = report["periods"]["after"]
    return {
        m: {"ap": per[m]["ap"], "cp": per[m]["card_precision_at_k"], "recall": per[m]["recall"]}
        for m in ("xgboost", "combined")
    }


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['world']:<14} {r['set']:<24} {r['features']:>3} features  AUC {r['auc']:.3f}  AP {r['ap']:.3f}  "
        f"CP@k {r['cp']:.3f}  ({r['frauds']} frauds / {r['n']:,} test rows; {r['seconds']:.0f} s)"
    )


def table(rows: list[dict[str, Any]], k: int) -> str:
    lines = [
        f"| world | textbook AUC | textbook AP | textbook CP@{k} | default AUC | default AP | default CP@{k} "
        "| AP margin | CP margin |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for world in dict.fromkeys(r["world"] for r in rows):
        by = {r["set"]: r for r in rows if r["world"] == world}
        if "default" not in by or "textbook" not in by:
            continue
        t, d = by["textbook"], by["default"]
        lines.append(
            f"| {world} | {t['auc']:.3f} | {t['ap']:.3f} | {t['cp']:.3f} | {d['auc']:.3f} | {d['ap']:.3f} "
            f"| {d['cp']:.3f} | {d['ap'] - t['ap']:+.3f} | {d['cp'] - t['cp']:+.3f} |"
        )
    for r in rows:
        if "river" in r:
            x, c = r["river"]["xgboost"], r["river"]["combined"]
            lines.append(
                f"\n{r['world']}, from the new pattern's first day to the end of the test week: XGBoost alone "
                f"AP {x['ap']:.3f} CP@{k} {x['cp']:.3f} recall {x['recall']:.3f}; with River AP {c['ap']:.3f} "
                f"CP@{k} {c['cp']:.3f} recall {c['recall']:.3f}"
            )
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    p.add_argument("--catalogs", nargs="+", default=["textbook", "default"], choices=list(CATALOGS))
    p.add_argument("--ablate", nargs="*", default=[], choices=list(ABLATIONS))
    p.add_argument("--cards", type=int, default=4000)
    p.add_argument("--merchants", type=int, default=500)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--no-search", dest="search", action="store_false", help="Default XGBoost parameters.")
    args = p.parse_args()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        for name in args.worlds:
            rows += run_world(WORLDS[name], args.seed, args, Path(tmp))
    print()
    print(table(rows, args.k))
    print(f"\nseed {args.seed}, {args.cards} cards, {args.merchants} merchants, search {args.search}; "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
