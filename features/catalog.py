"""The default feature set: the one place to add, remove or change a feature.

Add a line below (entity, aggregation, field, window) and retrain with `fraud train`: names and the
schema hash follow automatically, and the flow refuses models trained on another feature set.
"""

from features.spec import Entity, FeatureSet, WindowFeature, expand

CARD = Entity("card", ("card_id",))
MERCHANT = Entity("merchant", ("merchant_id",))
DEVICE = Entity("device", ("device_id",))

FEATURES = FeatureSet(
    windows=(
        *expand(CARD, ["count"], ["1h", "24h", "7d", "30d"]),
        *expand(CARD, ["sum", "mean", "max"], ["1h", "24h", "7d", "30d"], field="amount"),
        WindowFeature(CARD, "ratio_to_mean", "amount", "30d"),
        WindowFeature(CARD, "zscore", "amount", "30d"),
        WindowFeature(CARD, "time_since_last"),
        WindowFeature(CARD, "distinct", "merchant_id", "1h"),
        WindowFeature(CARD, "distinct", "merchant_id", "24h"),
        WindowFeature(CARD, "is_new", "merchant_id", "30d"),
        WindowFeature(CARD, "is_new", "device_id", "30d"),
        WindowFeature(CARD, "is_new", "country", "30d"),
        WindowFeature(CARD, "distance_km"),
        WindowFeature(CARD, "speed_kmh"),
        WindowFeature(CARD, "label_count", window="30d"),
        *expand(MERCHANT, ["count"], ["1h", "24h", "7d"]),
        WindowFeature(MERCHANT, "mean", "amount", "7d"),
        WindowFeature(MERCHANT, "distinct", "card_id", "24h"),
        WindowFeature(MERCHANT, "label_rate", window="30d"),
        WindowFeature(MERCHANT, "label_count", window="30d"),
        *expand(DEVICE, ["count"], ["1h", "24h"]),
        WindowFeature(DEVICE, "distinct", "card_id", "24h"),
    )
)
