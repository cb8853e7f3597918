"""Named generated worlds that detection quality is judged on (`benchmarks/quality.py`).

Each world changes what the model faces, not just its size: the fraud mix, which fields exist,
how labels arrive, whether a new pattern starts late. All share one timeline: four weeks of history
for the look-back windows, two weeks of training, a week's gap for the label delay, a week of
validation, a week of test (`SPLIT`). Labels keep arriving after the last day
(`labels_after_end`), so the last week is judged on its eventual truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fraud.datagen import GeneratorConfig
from fraud.train import Split

SPLIT = Split(train_days=14, valid_days=7, test_days=7, gap_days=7, start_day=28)
DAYS = int(SPLIT.test[1])

EVERY_PATTERN = (
    ("card_testing", 1.0),
    ("account_takeover", 1.0),
    ("compromised_merchant", 1.0),
    ("inflated_spending", 1.0),
    ("impossible_travel", 1.0),
    ("compromised_terminal", 1.0),
    ("compromised_card", 1.0),
    ("large_amount", 0.5),
)


@dataclass(frozen=True)
class World:
    name: str
    about: str
    knobs: dict[str, Any] = field(default_factory=dict)

    def config(self, seed: int, n_cards: int = 4000, n_merchants: int = 500) -> GeneratorConfig:
        base: dict[str, Any] = {
            "seed": seed, "days": DAYS, "n_cards": n_cards, "n_merchants": n_merchants,
            "fraud_rate_target": 0.008, "drift_day": None, "labels_after_end": True,
        }  # fmt: skip
        return GeneratorConfig(**{**base, **self.knobs})

    @property
    def late_pattern_day(self) -> int | None:
        day = self.knobs.get("drift_day")
        return int(day) if day is not None else None


WORLDS = {
    w.name: w
    for w in (
        World(
            "textbook",
            "the public benchmark's shape: five fields, merchants compromised for weeks, cards "
            "compromised for days with inflated amounts, large amounts; every label 7 days later",
            {
                "minimal": True,
                "mix": (("compromised_terminal", 1.0), ("compromised_card", 1.0), ("large_amount", 0.5)),
                "label_delay": "fixed",
                "label_delay_days": 7.0,
            },
        ),
        World(
            "minimal-mixed",
            "every pattern, but only the five required fields; chargeback-like label delays",
            {"minimal": True, "mix": EVERY_PATTERN},
        ),
        World(
            "spread-delays",
            "every pattern, all fields; labels spread over 1-35 days, frauds plus a 30% sample of "
            "genuine transactions",
            {
                "mix": EVERY_PATTERN,
                "label_delay": "spread",
                "label_delay_min_days": 1.0,
                "label_delay_max_days": 35.0,
                "label_policy": "fraud_and_sample",
                "legit_label_share": 0.3,
            },
        ),
        World(
            "late-pattern",
            "the bundled sample's five patterns, then a cash-out pattern nobody trained on from "
            "the first validation day",
            {"drift_day": int(SPLIT.valid[0])},
        ),
        World(
            "card-attacks",
            "card testing, account takeover and impossible travel dominate; all fields",
            {
                "mix": (
                    ("card_testing", 2.0),
                    ("account_takeover", 2.0),
                    ("impossible_travel", 1.0),
                    ("compromised_card", 0.5),
                ),
            },
        ),
    )
}
