"""Feature declarations as data: entity, source field, aggregation, window, label delay.

The engine (`features.state`) knows nothing about fraud; `features.catalog` declares the feature
set a user edits. Names are generated (`amount_sum_by_card_1h`) and the schema hash follows the
declaration, so a model trained on another feature set is refused by the flow.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Agg = Literal[
    "count", "sum", "mean", "std", "min", "max", "distinct", "is_new", "time_since_last",
    "ratio_to_mean", "zscore", "distance_km", "speed_kmh", "label_count", "label_rate", "delayed_count",
]  # fmt: skip

NUMERIC_AGGS = frozenset({"sum", "mean", "std", "min", "max", "ratio_to_mean", "zscore"})
CATEGORICAL_AGGS = frozenset({"distinct", "is_new"})
FIELDLESS_AGGS = frozenset(
    {"count", "time_since_last", "distance_km", "speed_kmh", "label_count", "label_rate", "delayed_count"}
)
UNWINDOWED_AGGS = frozenset({"time_since_last", "distance_km", "speed_kmh"})
LABEL_AGGS = frozenset({"label_count", "label_rate"})
DELAYED_AGGS = LABEL_AGGS | {"delayed_count"}  # read the window shifted back by `label_delay`

NUMERIC_FIELDS = frozenset({"amount", "lat", "lon"})
CATEGORICAL_FIELDS = frozenset(
    {"card_id", "merchant_id", "device_id", "ip", "country", "currency", "mcc", "channel"}
)
ENGINE_VERSION = 1

_UNITS_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^(\d+)([smhd])$")


class SpecError(ValueError):
    """A feature declaration that cannot be computed, with the reason."""


def duration_ms(text: str) -> int:
    """Milliseconds of a duration like "90s", "15m", "1h", "30d"."""
    m = _DURATION.match(text)
    if not m or int(m.group(1)) == 0:
        raise SpecError(f"bad duration {text!r}: use a positive integer and one of s, m, h, d (e.g. '24h')")
    return int(m.group(1)) * _UNITS_MS[m.group(2)]


@dataclass(frozen=True)
class Entity:
    """What state is keyed by: one or more transaction fields (e.g. card, or card x merchant)."""

    name: str
    fields: tuple[str, ...]

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise SpecError(f"entity name {self.name!r} must be lower_snake_case")
        unknown = set(self.fields) - CATEGORICAL_FIELDS
        if not self.fields or unknown:
            raise SpecError(f"entity {self.name!r}: key fields must be among {sorted(CATEGORICAL_FIELDS)}")


@dataclass(frozen=True)
class WindowFeature:
    """One aggregation of `field` over the entity's events in the look-back `window`.

    The window of a transaction at time t is (t - window, t], the transaction itself included.
    Label aggregations look at transactions in (t - delay - window, t - delay] whose fraud label
    had arrived by t; `delayed_count` counts every transaction of that shifted window (the
    denominator of `label_rate`, the volume a label-risk feature is measured on).
    """

    entity: Entity
    agg: Agg
    field: str | None = None
    window: str | None = None
    label_delay: str | None = None

    def __post_init__(self) -> None:
        where = f"feature {self.agg} by {self.entity.name}"
        if self.agg in FIELDLESS_AGGS:
            if self.field is not None:
                raise SpecError(f"{where}: takes no field")
        elif self.agg in NUMERIC_AGGS and self.field not in NUMERIC_FIELDS:
            raise SpecError(f"{where}: field must be numeric, one of {sorted(NUMERIC_FIELDS)}")
        elif self.agg in CATEGORICAL_AGGS and self.field not in CATEGORICAL_FIELDS:
            raise SpecError(f"{where}: field must be categorical, one of {sorted(CATEGORICAL_FIELDS)}")
        if (self.window is None) != (self.agg in UNWINDOWED_AGGS):
            raise SpecError(f"{where}: " + ("takes no window" if self.window else "needs a window"))
        if self.window is not None:
            duration_ms(self.window)
        if self.label_delay is not None:
            if self.agg not in DELAYED_AGGS:
                raise SpecError(f"{where}: label_delay only applies to {sorted(DELAYED_AGGS)}")
            duration_ms(self.label_delay)

    @property
    def name(self) -> str:
        head = (
            f"{self.field}_{self.agg}"
            if self.field
            else {"label_count": "fraud_count", "label_rate": "fraud_rate"}.get(self.agg, self.agg)
        )
        tail = f"_{self.window}" if self.window else ""
        delay = f"_delay_{self.label_delay}" if self.label_delay else ""
        return f"{head}_by_{self.entity.name}{tail}{delay}"

    @property
    def window_ms(self) -> int:
        return duration_ms(self.window) if self.window else 0

    @property
    def delay_ms(self) -> int:
        return duration_ms(self.label_delay) if self.label_delay else 0


TXN_FEATURES = ("amount", "hour_of_day", "day_of_week", "is_online", "has_device", "mcc_code")
KNOWN_TXN_FEATURES = (*TXN_FEATURES, "is_weekend", "is_night")
"""Features of the transaction alone (no history); `features.engine.TXN_FEATURE_CODE` computes them."""


@dataclass(frozen=True)
class FeatureSet:
    """An ordered feature declaration: per-transaction fields, then window features."""

    windows: tuple[WindowFeature, ...]
    txn: tuple[str, ...] = TXN_FEATURES
    entities: tuple[Entity, ...] = field(init=False)

    def __post_init__(self) -> None:
        unknown = set(self.txn) - set(KNOWN_TXN_FEATURES)
        if unknown:
            raise SpecError(f"unknown transaction features {sorted(unknown)}; known: {KNOWN_TXN_FEATURES}")
        names = self.names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(f"duplicate feature names: {dupes}")
        seen: dict[str, Entity] = {}
        for f in self.windows:
            if seen.setdefault(f.entity.name, f.entity) != f.entity:
                raise SpecError(f"entity {f.entity.name!r} declared with different key fields")
        object.__setattr__(self, "entities", tuple(seen.values()))

    @property
    def names(self) -> list[str]:
        """Transaction features, then each entity's features (entities in order of first mention)."""
        entities: list[Entity] = []
        for f in self.windows:
            if f.entity not in entities:
                entities.append(f.entity)
        return [*self.txn, *(f.name for e in entities for f in self.windows if f.entity == e)]

    def for_entity(self, entity: Entity) -> tuple[WindowFeature, ...]:
        return tuple(f for f in self.windows if f.entity == entity)

    @property
    def schema_hash(self) -> str:
        """Changes whenever a name, a definition or the engine's semantics change."""
        doc = {
            "engine": ENGINE_VERSION,
            "txn": list(self.txn),
            "windows": [
                [f.name, f.entity.fields, f.agg, f.field, f.window, f.label_delay] for f in self.windows
            ],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def expand(
    entity: Entity, aggs: Iterable[Agg], windows: Iterable[str], field: str | None = None
) -> list[WindowFeature]:
    """Every (aggregation, window) pair for one entity and field, in a stable order."""
    ws = list(windows)
    return [WindowFeature(entity, a, field, w) for a in aggs for w in ws]
