"""The CSV feature matrix (`features.export`, `fraud features`) against the engine's own output."""

from __future__ import annotations

import csv
import gzip
import json
import math
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from features.engine import FeatureEngine, FeaturePipeline, FeatureVector
from features.event_files import replay
from features.export import FRAMING, export_matrix, rfc3339_ms, write_matrix
from fraud.cli import app
from fraud.datagen import GeneratorConfig, write_files
from service.runtime import new_pipeline
from service.settings import Settings
from testkit.values import same


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    out = tmp_path_factory.mktemp("export-data")
    summary = write_files(
        out, GeneratorConfig(seed=1, days=5, n_cards=40, n_merchants=50, drift_day=None), compress=True
    )
    return out / "transactions.jsonl.gz", out / "labels.jsonl.gz", int(summary["n_transactions"])


@pytest.fixture(scope="module")
def pipeline() -> FeaturePipeline:
    return new_pipeline(Settings())


def engine_vectors(pipeline: FeaturePipeline, txns: Path, labels: Path | None) -> list[FeatureVector]:
    return [r for r in FeatureEngine(pipeline).run(replay(txns, labels)) if isinstance(r, FeatureVector)]


def read_csv(path: Path) -> list[list[str]]:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            return list(csv.reader(f))
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def parse(cell: str) -> float:
    return math.nan if cell == "" else float(cell)


def test_rfc3339_ms_is_exact_utc() -> None:
    assert rfc3339_ms(1_767_571_200_000) == "2026-01-05T00:00:00.000Z"
    assert rfc3339_ms(1_767_571_199_999) == "2026-01-04T23:59:59.999Z"
    ms = 1_767_600_000_123
    assert round(datetime.fromisoformat(rfc3339_ms(ms)).timestamp() * 1000) == ms


def test_matrix_has_one_row_per_transaction_with_the_engine_values(
    dataset: tuple[Path, Path, int], pipeline: FeaturePipeline, tmp_path: Path
) -> None:
    txns, labels, n = dataset
    out = tmp_path / "features.csv"
    assert write_matrix(pipeline, txns, labels, out) == n
    rows = read_csv(out)
    assert rows[0] == [*FRAMING, *pipeline.names, "late"]
    body = rows[1:]
    assert len(body) == n
    vectors = engine_vectors(pipeline, txns, labels)
    assert len(vectors) == n
    width = len(pipeline.names)
    empty_cells = 0
    for row, vec in zip(body, vectors, strict=True):
        t = vec.txn
        assert row[:4] == [t.txn_id, rfc3339_ms(t.ts_ms), t.card_id, t.merchant_id]
        assert round(datetime.fromisoformat(row[1]).timestamp() * 1000) == t.ts_ms
        cells = row[4 : 4 + width]
        assert row[4 + width :] == ["1" if vec.late else "0"]
        assert all(same(parse(c), v) for c, v in zip(cells, vec.values, strict=True)), t.txn_id
        empty_cells += sum(1 for c in cells if c == "")
    # the NaN <-> empty-cell path is exercised (no device / first transaction of a key)
    assert empty_cells > 0


def test_gzip_output_is_the_same_table_and_reproducible(
    dataset: tuple[Path, Path, int], pipeline: FeaturePipeline, tmp_path: Path
) -> None:
    txns, labels, n = dataset
    plain, gz1, gz2 = tmp_path / "f.csv", tmp_path / "a" / "f.csv.gz", tmp_path / "b" / "f.csv.gz"
    write_matrix(pipeline, txns, labels, plain)
    assert write_matrix(pipeline, txns, labels, gz1) == n
    write_matrix(pipeline, txns, labels, gz2)
    assert gz1.read_bytes()[:2] == b"\x1f\x8b"
    assert read_csv(gz1) == read_csv(plain)
    assert gz1.read_bytes() == gz2.read_bytes()


def test_dead_letters_are_skipped_and_counted(
    dataset: tuple[Path, Path, int], pipeline: FeaturePipeline, tmp_path: Path
) -> None:
    txns, _, n = dataset
    with gzip.open(txns, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    bad = tmp_path / "transactions.jsonl"
    bad.write_text("\n".join([*lines, "{not json", lines[-1], '{"txn_id": "x", "ts": 5}']) + "\n")
    stats = export_matrix(pipeline, bad, None, tmp_path / "f.csv")
    assert stats.rows == n
    assert stats.dead_letter_total == 3
    assert dict(stats.dead_letters) == {"bad_json": 1, "duplicate_txn": 1, "schema": 1}
    assert len(read_csv(tmp_path / "f.csv")) == n + 1


def test_cli_features_writes_the_matrix(dataset: tuple[Path, Path, int], tmp_path: Path) -> None:
    txns, labels, n = dataset
    out = tmp_path / "out" / "features.csv.gz"
    result = CliRunner().invoke(
        app, ["features", "--out", str(out), "--transactions", str(txns), "--labels", str(labels)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == n and report["dead_letters"] == 0 and report["labels_joined"] > 0
    rows = read_csv(out)
    assert len(rows) == n + 1
    assert rows[0][: len(FRAMING)] == list(FRAMING)
