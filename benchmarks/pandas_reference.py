"""The pandas reference the feature engine is checked against (tests/test_features_pandas.py runs
it on a small world; `python -m benchmarks.features_bench` on a large one, and times both)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.common import LATENESS_MS
from benchmarks.engine_world import BENCH, CARD, MERCHANT, Stream, feed_collect
from features.engine import FeaturePipeline
from features.events import Transaction
from features.spec import FeatureSet, WindowFeature

if TYPE_CHECKING:
    import pandas as pd


# ------------------------------------------------------------------------------------------- pandas
PANDAS_SUBSET = tuple(f for f in BENCH.windows if f.entity in (CARD, MERCHANT))


def pandas_frame(stream: Stream, rows: int) -> pd.DataFrame:
    """The first `rows` events as a notebook holds them: one row per transaction, ids as strings."""
    import pandas as pd

    return pd.DataFrame(
        {
            "ts": pd.to_datetime(stream.ts[:rows], unit="ms"),
            "card_id": [f"c{c}" for c in stream.card[:rows].tolist()],
            "merchant_id": [f"m{m}" for m in stream.merchant[:rows].tolist()],
            "amount": stream.amount[:rows],
        }
    )


def pandas_features(
    df: pd.DataFrame, features: Sequence[WindowFeature] = PANDAS_SUBSET, feature_set: FeatureSet = BENCH
) -> dict[str, np.ndarray]:
    """The card and merchant `features` the way a notebook computes them (groupby-rolling over event
    time, windows closed on the right), in row order; `time_since_last` looks back as far as the
    entity's longest window in `feature_set`."""
    import pandas as pd

    columns: dict[str, np.ndarray] = {}
    for entity, key in ((CARD, "card_id"), (MERCHANT, "merchant_id")):
        feats = [f for f in features if f.entity == entity]
        groups = df.groupby(key, sort=False)
        for window in dict.fromkeys(f.window for f in feats if f.window):
            here = [f for f in feats if f.window == window]
            aggs = list(dict.fromkeys(f.agg for f in here))
            rolled = groups.rolling(pd.Timedelta(milliseconds=here[0].window_ms), on="ts", closed="right")
            result = rolled["amount"].agg(aggs)
            result = result.reset_index(level=0, drop=True).sort_index()  # back to row order
            for f in here:
                columns[f.name] = result[f.agg].to_numpy(dtype=np.float64)
        for f in feats:
            if f.agg == "time_since_last":
                lookback = max(g.window_ms for g in feature_set.for_entity(entity))
                gap_ms = groups["ts"].diff().dt.total_seconds().to_numpy() * 1000.0
                columns[f.name] = np.where(gap_ms < lookback, gap_ms / 1000.0, np.nan)
    return columns


def engine_features(
    txns: Sequence[Transaction], features: Sequence[WindowFeature] = PANDAS_SUBSET
) -> tuple[float, np.ndarray]:
    """Seconds the engine takes over `txns` computing `features` alone, and its rows × features matrix."""
    pipeline = FeaturePipeline(FeatureSet(windows=tuple(features), txn=()), LATENESS_MS)
    seconds, values = feed_collect(pipeline, txns)
    return seconds, np.array(values, dtype=np.float64).reshape(len(txns), len(features))


def mismatches(
    engine: np.ndarray, reference: dict[str, np.ndarray], features: Sequence[WindowFeature] = PANDAS_SUBSET
) -> list[dict[str, Any]]:
    """The features whose engine column differs from the reference (rtol=1e-9, atol=1e-9, NaN == NaN)."""
    out = []
    for j, f in enumerate(features):
        a, b = engine[:, j], reference[f.name]
        ok = np.isclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            out.append(
                {"feature": f.name, "rows": int((~ok).sum()), "first_row": i, "engine": a[i], "pandas": b[i]}
            )
    return out


def pandas_check(stream: Stream, txns: Sequence[Transaction], rows: int) -> dict[str, Any]:
    """The card and merchant features the way a notebook computes them, against the engine: equal,
    and how fast each is."""
    rows = min(rows, len(stream))
    engine_s, engine_matrix = engine_features(txns[:rows])
    t0 = time.perf_counter()
    df = pandas_frame(stream, rows)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    columns = pandas_features(df)
    pandas_s = time.perf_counter() - t0
    return {
        "rows": rows,
        "features_compared": [f.name for f in PANDAS_SUBSET],
        "mismatching_features": mismatches(engine_matrix, columns),
        "engine_seconds": engine_s,
        "pandas_seconds": pandas_s,
        "pandas_dataframe_build_seconds": build_s,
        "engine_tx_per_s": rows / engine_s,
        "pandas_tx_per_s": rows / pandas_s,
        "engine_speedup_vs_pandas": pandas_s / engine_s,
    }
