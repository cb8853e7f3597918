"""Feature declarations as data: entity, source field, aggregation, window, label delay.

The engine (`features.plan`, `features.engine`) knows nothing about fraud; `features.catalog`
declares the feature set a user edits. Names are generated (`amount_sum_by_card_1h`) and the
schema hash follows the declaration, so a model trained on another feature set is refused by the
flow. Which aggregations exist, and their rules, is the table in `features.aggregations`; which
transaction-only features exist, `TXN_FEATURE_CODE` here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from features.aggregations import AGGREGATIONS

Agg = str
"""An aggregation's name: a key of `features.aggregations.AGGREGATIONS`."""

NUMERIC_AGGS = frozenset(k for k, a in AGGREGATIONS.items() if a.field == "numeric")
CATEGORICAL_AGGS = frozenset(k for k, a in AGGREGATIONS.items() if a.field == "categorical")
FIELDLESS_AGGS = frozenset(k for k, a in AGGREGATIONS.items() if a.field is None)
UNWINDOWED_AGGS = frozenset(k for k, a in AGGREGATIONS.items() if not a.windowed)
DELAYED_AGGS = frozenset(k for k, a in AGGREGATIONS.items() if a.delayed)  # may be shifted by `label_delay`

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
        if self.agg not in AGGREGATIONS:
            raise SpecError(f"{where}: unknown aggregation; known: {sorted(AGGREGATIONS)}")
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
        head = f"{self.field}_{self.agg}" if self.field else AGGREGATIONS[self.agg].title or self.agg
        tail = f"_{self.window}" if self.window else ""
        delay = f"_delay_{self.label_delay}" if self.label_delay else ""
        return f"{head}_by_{self.entity.name}{tail}{delay}"

    @property
    def window_ms(self) -> int:
        return duration_ms(self.window) if self.window else 0

    @property
    def delay_ms(self) -> int:
        return duration_ms(self.label_delay) if self.label_delay else 0


TXN_FEATURE_CODE = {
    "amount": "t.amount",
    "hour_of_day": "float((t.ts_ms // 3600000) % 24)",
    "day_of_week": "float((t.ts_ms // 86400000 + 3) % 7)",  # 1970-01-01 was a Thursday; Monday = 0
    "is_online": "float(t.channel == 'online')",
    "has_device": "float(t.device_id is not None)",
    "mcc_code": "mcc_code(t.mcc)",
    "is_weekend": "float((t.ts_ms // 86400000 + 3) % 7 >= 5)",
    "is_night": "float((t.ts_ms // 3600000) % 24 < 6)",  # 00:00-05:59 UTC
}
"""The features of the transaction alone (no history), the only declaration of them: a
`FeatureSet` may name exactly these in `txn`, and `features.engine.txn_feature_function` compiles
them. Each is a Python expression over the transaction `t`, which may call `mcc_code` (the MCC as a
number, NaN if absent or not numeric) and use `NAN`."""

TXN_FEATURES = ("amount", "hour_of_day", "day_of_week", "is_online", "has_device", "mcc_code")
"""The default transaction features."""


@dataclass(frozen=True)
class FeatureSet:
    """An ordered feature declaration: per-transaction fields, then window features."""

    windows: tuple[WindowFeature, ...]
    txn: tuple[str, ...] = TXN_FEATURES
    entities: tuple[Entity, ...] = field(init=False)

    def __post_init__(self) -> None:
        unknown = set(self.txn) - set(TXN_FEATURE_CODE)
        if unknown:
            raise SpecError(
                f"unknown transaction features {sorted(unknown)}; known: {tuple(TXN_FEATURE_CODE)}"
            )
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
