"""models.artifact: versions, save/load round trip, load errors and the schema check."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from models.artifact import (
    ArtifactError,
    ModelArtifact,
    check_schema,
    load,
    make_version,
    save,
)
from models.xgb import XGBScorer, train_xgb

NAMES = ["amount", "velocity_1h", "distance_km"]
HASH = "0123abcdef" + "0" * 54


@pytest.fixture(scope="module")
def artifact() -> ModelArtifact:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 3))
    X[rng.random(X.shape) < 0.1] = np.nan
    y = (np.nan_to_num(X[:, 1]) > 1.0).astype(int)
    booster = train_xgb(X, y, NAMES, params={"num_boost_round": 10})
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    return ModelArtifact(
        version=make_version(HASH, when),
        feature_names=NAMES,
        schema_hash=HASH,
        threshold=0.42,
        metrics={"auc": 0.97, "ap": math.nan, "alerts": 12, "precision": np.float32(0.5)},
        trained_at=when.isoformat(),
        params={"max_depth": 5, "eval_metric": ["auc", "aucpr"]},
        booster=booster,
    )


def test_make_version() -> None:
    assert make_version(HASH, datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)) == "xgb-20240506070809-0123abcd"
    paris = timezone(timedelta(hours=2))
    assert make_version("ABCDEF99", datetime(2024, 1, 1, 1, 0, tzinfo=paris)) == (
        "xgb-20231231230000-abcdef99"
    )
    with pytest.raises(ValueError, match="timezone"):
        make_version(HASH, datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="hex"):
        make_version("not-a-hash", datetime(2024, 1, 1, tzinfo=UTC))


def test_save_load_round_trip(artifact: ModelArtifact, tmp_path: Path) -> None:
    save(artifact, tmp_path / "a")
    loaded = load(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["meta.json", "model.ubj"]
    for field in ("version", "feature_names", "schema_hash", "threshold", "trained_at", "params"):
        assert getattr(loaded, field) == getattr(artifact, field)
    assert math.isnan(loaded.metrics["ap"]) and loaded.metrics["precision"] == 0.5
    X = np.random.default_rng(1).normal(size=(200, 3))
    X[::3, 0] = np.nan
    np.testing.assert_array_equal(
        XGBScorer(loaded.booster, NAMES).score(X), XGBScorer(artifact.booster, NAMES).score(X)
    )
    text = (tmp_path / "a" / "meta.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    save(replace(artifact, threshold=0.5), tmp_path / "a")  # overwriting is fine
    assert load(tmp_path / "a").threshold == 0.5
    assert loaded.reference is None  # an artifact without a drift reference loads without one
    ref = {"names": ["x"], "edges": [[0.5]], "expected": [[0.0, 0.4, 0.6]]}
    save(replace(artifact, reference=ref), tmp_path / "b")
    assert load(tmp_path / "b").reference == ref


def test_load_errors_are_clear(artifact: ModelArtifact, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load(tmp_path / "nope")
    d = tmp_path / "a"
    save(artifact, d)
    meta = json.loads((d / "meta.json").read_text())

    (d / "meta.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot read"):
        load(d)
    (d / "meta.json").write_text(json.dumps({**meta, "threshold": "high"}))
    with pytest.raises(ArtifactError, match="'threshold'"):
        load(d)
    (d / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "version"}))
    with pytest.raises(ArtifactError, match="'version'"):
        load(d)
    (d / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ArtifactError, match="format"):
        load(d)
    (d / "meta.json").write_text(json.dumps({**meta, "feature_names": ["x", "y", "z"]}))
    with pytest.raises(ArtifactError, match="does not match"):
        load(d)
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "model.ubj").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot load"):
        load(d)
    (d / "model.ubj").unlink()
    with pytest.raises(ArtifactError, match=r"model\.ubj is missing"):
        load(d)


def test_check_schema(artifact: ModelArtifact) -> None:
    check_schema(artifact, HASH, list(NAMES))  # matching: no error
    other = "ffff" * 16
    with pytest.raises(ArtifactError) as exc:
        check_schema(artifact, other, ["amount", "velocity_24h", "distance_km"])
    message = str(exc.value)
    for part in (HASH, other, "'velocity_1h'", "'velocity_24h'", "position 1", "fraud train"):
        assert part in message
    with pytest.raises(ArtifactError, match="3 features, pipeline has 4"):
        check_schema(artifact, other, [*NAMES, "extra"])
    with pytest.raises(ArtifactError, match="only the hash differs"):
        check_schema(artifact, other, NAMES)
