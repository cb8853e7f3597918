"""The engine's card and merchant window features equal the way a notebook computes them with pandas
(groupby-rolling over event time), on a small synthetic world: the reference computation of
`python -m benchmarks.features_bench`, which checks it again at benchmark size."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.engine_world import World, poisson_stream
from benchmarks.pandas_reference import (
    PANDAS_SUBSET,
    engine_features,
    mismatches,
    pandas_features,
    pandas_frame,
)

pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def world_rows() -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """35 days (past the longest window, 30d) of 120 cards over 30 merchants: a few thousand rows."""
    world = World(np.random.default_rng(7), cards=120, merchants=30, devices=120, zipf=0.7)
    stream = poisson_stream(world, days=35, rate=1.5)
    txns = world.transactions(stream)
    _, engine = engine_features(txns)
    return engine, pandas_features(pandas_frame(stream, len(stream))), len(stream)


def test_engine_equals_pandas_on_every_card_and_merchant_feature(
    world_rows: tuple[np.ndarray, dict[str, np.ndarray], int],
) -> None:
    engine, reference, rows = world_rows
    assert rows > 3000
    assert engine.shape == (rows, len(PANDAS_SUBSET))
    assert set(reference) == {f.name for f in PANDAS_SUBSET}
    assert mismatches(engine, reference) == []


def test_the_comparison_sees_a_difference(world_rows: tuple[np.ndarray, dict[str, np.ndarray], int]) -> None:
    """Not vacuous: the data gives every feature values (time_since_last both a gap and none),
    and one changed value is reported with its row."""
    engine, reference, rows = world_rows
    for j, f in enumerate(PANDAS_SUBSET):
        assert np.isfinite(engine[:, j]).any(), f.name
    since = next(j for j, f in enumerate(PANDAS_SUBSET) if f.agg == "time_since_last")
    assert np.isnan(engine[:, since]).any()
    changed = dict(reference)
    name = PANDAS_SUBSET[0].name
    changed[name] = reference[name].copy()
    changed[name][rows // 2] += 1.0
    assert mismatches(engine, changed) == [
        {
            "feature": name,
            "rows": 1,
            "first_row": rows // 2,
            "engine": engine[rows // 2, 0],
            "pandas": changed[name][rows // 2],
        }
    ]
