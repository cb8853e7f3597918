"""Drift detection on the late-pattern sample, and silence on the same world without the pattern.

    python -m benchmarks.drift [--seed 7] [--days 90] [--cards 1000] [--drift-day 60]

The bundled sample is `fraud generate`'s world (seed 7, 90 days, 1,000 cards) in which a cash-out
pattern nobody trained on starts on day 60; the default artifact was trained on days 0-38 of it.
This program generates that world and the same world with `--drift-day 0` (no late pattern),
replays each through the serving scorer exactly as `fraud evaluate` does (the feature engine, the
online model learning every label when it arrives, the scorer's drift watch with the settings'
defaults, `FRAUD_DRIFT_*` applying), and prints every drift event with its day (counted from the
world's first day), then, per world, the first event of each kind and how many days after the
pattern's start it came. Events are what the flow writes to `fraud:drift`.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.common import DAY_MS, log, parser
from fraud.datagen import GeneratorConfig, write_files
from fraud.train import scored_batches
from models.drift import DriftEvent
from service.runtime import load_model, new_pipeline, new_scorer
from service.settings import Settings


def events_of(transactions: Path, labels: Path, settings: Settings) -> tuple[list[DriftEvent], int]:
    """Drift events of one replay, and the first transaction's UTC day (epoch ms)."""
    pipeline = new_pipeline(settings)
    scorer = new_scorer(settings, load_model(settings, pipeline))
    events: list[DriftEvent] = []
    first: int | None = None
    for decisions in scored_batches(scorer, pipeline, transactions, labels, settings.label_ttl_days):
        if first is None and decisions:
            first = decisions[0].txn.ts_ms
        events += scorer.last.events
    return events, (first or 0) // DAY_MS * DAY_MS


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--cards", type=int, default=1000)
    ap.add_argument("--merchants", type=int, default=200)
    ap.add_argument("--drift-day", type=int, default=60)
    ap.add_argument("--trained-until", type=float, default=38, help="last day the artifact trained on")
    args = ap.parse_args()
    settings = Settings()
    print(
        f"drift watch: PSI over {settings.drift_window_hours} h, threshold {settings.drift_psi_threshold}, "
        f"ADWIN delta {settings.drift_delta} on missed fraud labels, quality over the last "
        f"{settings.drift_label_window} labels"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, day in (("late pattern", args.drift_day), ("no late pattern", None)):
            out = Path(tmp) / name.replace(" ", "-")
            config = GeneratorConfig(
                seed=args.seed,
                days=args.days,
                n_cards=args.cards,
                n_merchants=args.merchants,
                drift_day=day,
                fraud_rate_target=0.009,
            )
            log(f"generating {name} ...")
            write_files(out, config)
            log(f"replaying {name} ...")
            events, day0 = events_of(out / "transactions.jsonl", out / "labels.jsonl", settings)
            for e in events:
                print(
                    f"  {name}: day {(e.at_ms - day0) / DAY_MS:6.2f} {e.kind:7} {e.what:28} {e.state:9} "
                    f"{e.value:.4f} (against {e.threshold:.4f}) since day {(e.since_ms - day0) / DAY_MS:.2f}"
                )
            drifting = [e for e in events if e.state == "drifting"]
            trained = day0 + args.trained_until * DAY_MS
            kinds = Counter(e.kind for e in drifting if e.at_ms < trained)
            later = Counter(e.kind for e in drifting if e.at_ms >= trained)
            summary = (
                f"{name}: drifting events before day {args.trained_until:g} (the flow's state filling "
                f"up, the training period) {dict(kinds)}, from day {args.trained_until:g} on {dict(later)}"
            )
            for kind in ("concept", "data"):
                after = [
                    e
                    for e in drifting
                    if e.kind == kind and day is not None and e.at_ms >= day0 + day * DAY_MS
                ]
                if after:
                    e = after[0]
                    summary += (
                        f"; first {kind} event after the pattern's start: {e.what}, day "
                        f"{(e.at_ms - day0) / DAY_MS:.2f} ({(e.at_ms - day0) / DAY_MS - day:.2f} days after it)"
                    )
            print(summary, flush=True)


if __name__ == "__main__":
    main()
