"""Training's data without training's memory: rows on disk, labels joined by sorting, cards as ranks.

Each part is checked against the plain in-memory way it replaces (a NumPy matrix, the labels read
into a dictionary, card ids as strings), which stays the oracle."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb
from typer.testing import CliRunner

import fraud.dataset
import models.matrix
from features.engine import FeatureEngine, FeatureVector
from features.event_files import replay
from fraud.cli import app
from fraud.dataset import Dataset, build_dataset, id_array, label_columns, read_labels
from fraud.train import MAX_REFERENCE_ROWS, reference_rows
from models.matrix import RowFile
from models.xgb import DEFAULT_PARAMS, EARLY_STOPPING_ROUNDS, NUM_BOOST_ROUND, train_xgb
from service.runtime import new_pipeline
from service.settings import Settings


def test_a_row_file_reads_back_what_was_appended(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models.matrix, "BLOCK_ROWS", 7)  # many blocks, and reads across their edges
    rng = np.random.default_rng(3)
    want = rng.normal(size=(50, 4)).astype(np.float32)
    want[rng.random(want.shape) < 0.2] = np.nan
    rows = RowFile(4, tmp_path)
    for i, row in enumerate(want):
        rows.append(row.tolist())
        if i == 20:  # reads between appends see every row so far
            np.testing.assert_array_equal(rows[:], want[:21])
    assert rows.shape == want.shape and len(rows) == 50 and rows.nbytes == want.nbytes
    np.testing.assert_array_equal(rows[:], want)
    np.testing.assert_array_equal(rows[5:33], want[5:33])
    np.testing.assert_array_equal(rows[3:40:6], want[3:40:6])
    np.testing.assert_array_equal(rows[-1], want[-1])
    mask = rng.random(50) < 0.3
    np.testing.assert_array_equal(rows[mask], want[mask])
    picks = np.array([49, 0, 7, 7, 13, 6, 48, 14])  # unsorted, repeated, on block edges
    np.testing.assert_array_equal(rows[picks], want[picks])
    np.testing.assert_array_equal(rows[np.array([], dtype=np.int64)], want[:0])
    for bad in (np.array([50]), np.array([-1]), np.ones(49, dtype=bool)):
        with pytest.raises(IndexError):
            rows[bad]
    with pytest.raises(IndexError):
        rows[50]
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing is left behind, whatever happens
    rows.close()


T0 = 1_767_225_600_000  # 2026-01-01T00:00Z


@pytest.mark.parametrize("chunk", [2, fraud.dataset.CHUNK])
def test_labels_join_as_the_dictionary_of_the_labels_file_does(
    chunk: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first valid verdict of a txn_id counts, with its arrival time (also when the file is
    read in chunks of two); ids are matched exactly (non-ASCII, a trailing NUL, prefixes of each
    other); a txn_id on two rows labels both; rows without a label get none."""
    monkeypatch.setattr(fraud.dataset, "CHUNK", chunk)
    lines = [
        {"txn_id": "a", "is_fraud": True, "ts": T0 + 1000},
        {"txn_id": "a", "is_fraud": False, "ts": T0 + 500},  # a second verdict: the first counts
        {"txn_id": "b", "is_fraud": True, "ts": "not a time"},  # undecodable: skipped...
        {"txn_id": "b", "is_fraud": False, "ts": T0 + 2000},  # ...so this one counts
        {"txn_id": "ab", "is_fraud": True, "ts": T0 + 3000},
        {"txn_id": "é\u0000", "is_fraud": True, "ts": T0 + 4000},
        {"txn_id": "é", "is_fraud": False, "ts": T0 + 5000},
        {"txn_id": "nowhere", "is_fraud": True, "ts": T0 + 6000},  # no such transaction
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    ids = ["é", "a", "x", "ab", "é\u0000", "b", "a", ""]
    y, when = label_columns(path, id_array(ids))
    want = Dataset.of(np.zeros((len(ids), 1)), range(len(ids)), ids, ids, read_labels(path))
    assert y.tolist() == want.y.tolist() == [0, 1, -1, 1, 1, 0, 1, -1]
    assert when.tolist() == want.label_ts.tolist()
    assert Dataset.of(np.zeros((len(ids), 1)), range(len(ids)), ids, ids, {}).txn_ids == ids
    none_y, _ = label_columns(None, id_array(ids))
    assert none_y.tolist() == [-1] * len(ids)


def test_the_drift_reference_samples_large_training_periods_evenly() -> None:
    small = np.zeros(1000, dtype=bool)
    small[::3] = True
    assert reference_rows(small).tolist() == np.flatnonzero(small).tolist()
    large = np.ones(3 * MAX_REFERENCE_ROWS + 1, dtype=bool)
    picked = reference_rows(large)
    assert picked.size == MAX_REFERENCE_ROWS and picked[0] == 0 and picked[-1] == large.size - 1
    assert set(np.diff(picked).tolist()) <= {3, 4}  # evenly spread over the period


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    result = CliRunner().invoke(
        app, ["generate", "--cards", "300", "--merchants", "60", "--days", "40", "--seed", "5", "--out", str(out),
              "--no-gzip"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_a_replayed_dataset_is_the_in_memory_one(world: Path) -> None:
    """`build_dataset` (rows on disk, labels by sorting, cards as ranks) holds what the replay's
    vectors and the labels dictionary give, row for row and bit for bit."""
    pipeline = new_pipeline(Settings())
    txns, labels = world / "transactions.jsonl", world / "labels.jsonl"
    vectors = [v for v in FeatureEngine(pipeline).run(replay(txns, labels)) if isinstance(v, FeatureVector)]
    want = Dataset.of(
        np.array([v.values for v in vectors], dtype=np.float32),
        [v.txn.ts_ms for v in vectors],
        [v.txn.txn_id for v in vectors],
        [v.txn.card_id for v in vectors],
        read_labels(labels),
    )
    got = build_dataset(pipeline, txns, labels)
    assert isinstance(got.X, RowFile) and got.X.shape == want.X.shape
    assert got.txn_ids == want.txn_ids and len(got) == len(vectors) > 5000
    np.testing.assert_array_equal(got.X[:].view(np.uint32), want.X.view(np.uint32))  # NaN too
    for name in ("y", "label_ts", "ts_ms", "cards"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert (got.y == 1).sum() > 20 and (got.y == -1).any()  # frauds, and rows with no label yet
    assert got.known_compromised.any()
    assert np.array_equal(got.known_compromised, want.known_compromised)


def test_training_from_disk_gives_the_in_memory_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train_xgb` on a `RowFile` (its quantised matrix on disk too) gives XGBoost's in-memory
    model from the same rows, tree for tree; its cache files are gone once it returns."""
    rng = np.random.default_rng(7)
    n, names = 6000, [f"f{i}" for i in range(6)]
    X = rng.normal(size=(n, len(names))).astype(np.float32)
    X[rng.random(X.shape) < 0.3] = np.nan  # missing values, as the device features have
    y = ((np.nan_to_num(X[:, 0]) + np.nan_to_num(X[:, 1]) * rng.random(n)) > 1.2).astype(np.int8)
    rows = RowFile(len(names), tmp_path)
    for r in X:
        rows.append(r.tolist())
    train, valid = np.arange(n) < 4000, np.arange(n) >= 4000
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    got = train_xgb(rows, y, names, rows=train, eval_set=(X[valid], y[valid]), nthread=1)
    assert list(tmp_path.iterdir()) == []
    params = {**DEFAULT_PARAMS, "device": "cpu", "nthread": 1, "seed": 0}
    dtrain = xgb.QuantileDMatrix(X[train], label=y[train], feature_names=names, missing=np.nan, max_bin=256)
    dvalid = xgb.QuantileDMatrix(X[valid], label=y[valid], feature_names=names, missing=np.nan, ref=dtrain)
    want = xgb.train(
        params, dtrain, NUM_BOOST_ROUND, evals=[(dvalid, "eval")], early_stopping_rounds=EARLY_STOPPING_ROUNDS,
        verbose_eval=False,
    )  # fmt: skip
    want = want[: want.best_iteration + 1]
    assert got.num_boosted_rounds() == want.num_boosted_rounds() > 5
    assert got.get_dump() == want.get_dump()
    np.testing.assert_array_equal(got.inplace_predict(X), want.inplace_predict(X))
