"""The feature sets: the one place to add, remove or change a feature.

`FEATURES` is the default set the flow serves; `TEXTBOOK` is the reference it must beat, the 15
features of the classic card-fraud baseline, declared with the same machinery. `FRAUD_FEATURE_SET`
picks one by name (`CATALOGS`). Add a line (entity, aggregation, field, window) and retrain with
`fraud train`: names and the schema hash follow automatically, and the flow refuses models trained
on another feature set. Why each default feature is here: docs/features.md, "The two feature sets".
"""

from features.spec import Entity, FeatureSet, WindowFeature, expand

CARD = Entity("card", ("card_id",))
MERCHANT = Entity("merchant", ("merchant_id",))
DEVICE = Entity("device", ("device_id",))

LABEL_DELAY = "3d"
"""How far the default set's label-risk windows are shifted back: the rate over (t - 3d - w,
t - 3d]. A longer shift sees more of the window's labels, a shorter one sees more recent fraud;
3 days measured better than 7 or 14 on the generated worlds, including those whose labels all
take 7 days (docs/features.md, "Label delay")."""

TEXTBOOK_DELAY = "7d"  # the textbook's windows are shifted by its benchmark's label delay


def _label_risk(entity: Entity, windows: list[str], delay: str = LABEL_DELAY) -> list[WindowFeature]:
    """Fraud rate and transaction volume of `entity` over each window, shifted back by `delay`."""
    return [
        WindowFeature(entity, agg, window=w, label_delay=delay)
        for agg in ("label_rate", "delayed_count")
        for w in windows
    ]


def _risk_rates(entity: Entity, windows: list[str], delay: str) -> list[WindowFeature]:
    """Fraud rate of `entity` over each window, shifted back by `delay`."""
    return [WindowFeature(entity, "label_rate", window=w, label_delay=delay) for w in windows]


DEFAULT_TXN = ("amount", "hour_of_day", "is_online", "has_device", "mcc_code")


def default_features(label_delay: str = LABEL_DELAY) -> FeatureSet:
    """The default feature set, its label-risk windows shifted back by `label_delay`."""
    return FeatureSet(
        txn=DEFAULT_TXN,
        windows=(
            *expand(CARD, ["count"], ["1h", "24h", "7d", "30d"]),
            *expand(CARD, ["sum", "mean", "max"], ["1h", "24h", "7d", "30d"], field="amount"),
            *expand(CARD, ["ratio_to_mean"], ["24h", "7d", "30d"], field="amount"),
            WindowFeature(CARD, "zscore", "amount", "30d"),
            WindowFeature(CARD, "time_since_last"),
            WindowFeature(CARD, "distinct", "merchant_id", "1h"),
            WindowFeature(CARD, "distinct", "merchant_id", "24h"),
            WindowFeature(CARD, "is_new", "merchant_id", "30d"),
            WindowFeature(CARD, "is_new", "device_id", "30d"),
            WindowFeature(CARD, "is_new", "country", "30d"),
            WindowFeature(CARD, "distance_km"),
            WindowFeature(CARD, "speed_kmh"),
            *_risk_rates(CARD, ["7d", "30d"], label_delay),
            *expand(MERCHANT, ["count"], ["1h", "24h", "7d"]),
            WindowFeature(MERCHANT, "mean", "amount", "7d"),
            WindowFeature(MERCHANT, "distinct", "card_id", "24h"),
            *_label_risk(MERCHANT, ["1d", "7d", "30d"], label_delay),
            *expand(DEVICE, ["count"], ["1h", "24h"]),
            WindowFeature(DEVICE, "distinct", "card_id", "24h"),
            *_risk_rates(DEVICE, ["7d", "30d"], label_delay),
        ),
    )


FEATURES = default_features()

TEXTBOOK = FeatureSet(
    txn=("amount", "is_weekend", "is_night"),
    windows=(
        *expand(CARD, ["count"], ["1d", "7d", "30d"]),
        *expand(CARD, ["mean"], ["1d", "7d", "30d"], field="amount"),
        *_label_risk(MERCHANT, ["1d", "7d", "30d"], TEXTBOOK_DELAY),
    ),
)
"""The textbook baseline (Le Borgne et al., "Reproducible Machine Learning for Credit Card Fraud
Detection"): amount, weekend and night flags; per card the count and mean amount over 1, 7 and 30
days; per merchant the count and fraud rate over 1, 7 and 30 days shifted back by the label delay."""

CATALOGS = {"default": FEATURES, "textbook": TEXTBOOK}
