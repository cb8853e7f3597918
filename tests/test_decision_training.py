"""`fraud train --from-decisions`: the decision log of a real flow run over real Redis gives the
training set a replay of the files gives, and a model trained on it; what cannot be trained on is
refused with one line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from bytewax.testing import run_main
from typer.testing import CliRunner

from features.engine import FeaturePipeline
from flows.fraud import build
from fraud.cli import app
from fraud.datagen import GeneratorConfig, write_files
from fraud.dataset import Dataset, build_dataset, read_labels
from fraud.decision_log import (
    DecisionLogError,
    dataset_of,
    decision_dataset,
    parse_ts_ms,
    read_decision_log,
    stream_labels,
)
from fraud.producer import replay_files
from fraud.train import Split, train
from models.artifact import load
from models.registry import Registry
from service.redis_client import connect
from service.runtime import new_pipeline
from service.settings import Settings, get_settings

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

TAG = "dtrain"  # every key this module writes starts with it
SHARDS = 2
SPLIT = Split(train_days=22, gap_days=5, valid_days=8, test_days=8, start_day=0)
SPLIT_ARGS = ["--train-days", "22", "--gap-days", "5", "--valid-days", "8", "--test-days", "8"]


@dataclass
class Served:
    txns: Path
    labels: Path
    settings: Settings  # the flow's: Redis source, decision log on, this module's stream names
    pipeline: FeaturePipeline


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Served]:
    """45 days of 250 cards (fraud-rich, every label kept, so that each period of `SPLIT` is
    judged on both classes), pushed to two input shard streams with `replay_files`, scored by the
    real flow reading them (Redis source, idle exit) with the decision log on."""
    out = tmp_path_factory.mktemp("decision-world")
    write_files(
        out,
        GeneratorConfig(
            seed=5,
            days=45,
            n_cards=250,
            n_merchants=60,
            drift_day=None,
            fraud_rate_target=0.03,
            labels_after_end=True,
        ),
    )
    txns, labels = out / "transactions.jsonl", out / "labels.jsonl"
    with pytest.MonkeyPatch.context() as mp:  # no developer FRAUD_* variable may leak into the run
        for name in list(os.environ):
            if name.startswith("FRAUD_") and not name.startswith("FRAUD_TEST_"):
                mp.delenv(name)
        get_settings.cache_clear()
        settings = Settings(
            source="redis",
            redis_url=redis_url,  # type: ignore[arg-type]
            input_stream=f"{TAG}:in",
            input_shards=SHARDS,
            source_idle_exit_s=1.0,
            decision_log=True,
            decision_stream=f"{TAG}:decisions",
            alerts_stream=f"{TAG}:alerts",
            dlq_stream=f"{TAG}:dlq",
            late_stream=f"{TAG}:late",
            drift_stream=f"{TAG}:drift",
            progress_interval_s=600,
            drift_watch=False,
        )
        client = connect(redis_url)
        try:
            stale = list(client.scan_iter(match=f"{TAG}:*"))
            if stale:
                client.delete(*stale)
            pushed = replay_files(client, txns, labels, settings.input_stream, SHARDS)
            run_main(build(settings))
            assert client.xlen(settings.decision_stream) == pushed["transactions"]
        finally:
            client.close()
        yield Served(txns, labels, settings, new_pipeline(settings))
    get_settings.cache_clear()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A client that leaves the database as it is (the module's streams live across its tests)."""
    c = connect(redis_url)
    try:
        yield c
    finally:
        c.close()


def assert_same_dataset(got: Dataset, want: Dataset) -> None:
    assert got.txn_ids == want.txn_ids
    assert np.array_equal(got.ts_ms, want.ts_ms) and got.ts_ms.dtype == np.int64
    assert np.array_equal(got.cards, want.cards)
    assert got.X.dtype == want.X.dtype == np.float32 and got.X.shape == want.X.shape
    got_X, want_X = got.X[:], want.X[:]  # a replay's rows are on disk (`RowFile`)
    nan = np.isnan(want_X)
    assert np.array_equal(np.isnan(got_X), nan)
    assert np.array_equal(got_X.view(np.uint32)[~nan], want_X.view(np.uint32)[~nan])  # bit for bit
    assert np.array_equal(got.y, want.y) and np.array_equal(got.label_ts, want.label_ts)
    assert got.day0_ms == want.day0_ms


def test_the_decision_log_is_the_training_set_of_the_files(served: Served, client: redis.Redis) -> None:
    """Features, times, cards, labels and their arrival times from the decision log + the input
    streams' labels (or the labels file) are exactly what replaying the files gives."""
    want = build_dataset(served.pipeline, served.txns, served.labels)
    keys = list(zip(want.ts_ms.tolist(), want.txn_ids, strict=True))
    assert keys == sorted(keys)  # the files' order is event time, ties by id: the log's order
    from_streams, log = decision_dataset(client, served.settings, served.pipeline, page=700)
    assert_same_dataset(from_streams, want)
    from_file, _ = decision_dataset(client, served.settings, served.pipeline, served.labels)
    assert_same_dataset(from_file, want)
    assert log.entries == len(log) == len(want.txn_ids) and log.duplicates == 0
    assert len(log.versions) == 1 and next(iter(log.versions)).startswith("xgb-")

    # The comparison can fail where it matters. Labels: most arrive days after their transaction,
    # so a join that dropped the arrival time would change which rows training may use.
    labelled = want.y >= 0
    assert (want.y == 1).sum() > 50 and labelled.sum() > len(want.y) // 2
    assert ((want.label_ts[labelled] - want.ts_ms[labelled]) > 86_400_000).mean() > 0.9
    assert want.training_rows(*SPLIT.train).sum() < (want.period(*SPLIT.train) & labelled).sum()
    # Columns: no two are equal (but two the generator makes equal: only online payments carry a
    # device), so any two swapped would differ.
    X = want.X[:]
    assert np.isnan(X).any()  # missing values take part
    X = np.where(np.isnan(X), np.float32(-1e30), X)
    names = served.pipeline.names
    equal = {
        (names[j], names[i]) for i in range(X.shape[1]) for j in range(i) if np.array_equal(X[:, i], X[:, j])
    }
    assert equal <= {("is_online", "has_device"), ("has_device", "is_online")}


def test_labels_from_the_input_streams_are_those_of_the_file(served: Served, client: redis.Redis) -> None:
    got = stream_labels(client, served.settings.input_stream, SHARDS, page=500)
    assert got == read_labels(served.labels)


def test_train_from_decisions_writes_the_model_the_files_give(
    served: Served, client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fraud train --from-decisions` saves a loadable artifact whose report names the decision
    log, the same model (byte for byte) `fraud train` fits on the files."""
    s = served.settings
    for name, value in {
        "FRAUD_REDIS_URL": s.redis_url_value(),
        "FRAUD_DECISION_STREAM": s.decision_stream,
        "FRAUD_INPUT_STREAM": s.input_stream,
        "FRAUD_INPUT_SHARDS": str(SHARDS),
    }.items():
        monkeypatch.setenv(name, str(value))
    result = CliRunner().invoke(
        app, ["train", "--from-decisions", "--out", str(tmp_path / "log"), "--no-search", *SPLIT_ARGS]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    data, _ = decision_dataset(client, s, served.pipeline)
    n, m = len(data.txn_ids), int((data.y >= 0).sum())
    assert report["source"] == f"decision log {s.decision_stream} ({n} decisions, {m} labelled)"
    assert report["decision_log"]["duplicates"] == 0 and report["decision_log"]["entries"] == n
    art = load(tmp_path / "log")
    assert art.version == report["version"] and art.metrics["source"] == report["source"]
    registry = Registry(tmp_path / "model-registry")  # the suite's FRAUD_MODEL_REGISTRY
    assert registry.versions() == [art.version] and report["registered"].startswith(art.version)
    assert registry.state().champion is None  # a candidate: nothing is promoted
    assert art.feature_names == list(served.pipeline.names)
    assert art.schema_hash == served.pipeline.schema_hash

    files = train(
        s, served.pipeline, served.txns, served.labels, tmp_path / "files", split=SPLIT, search=False
    )
    assert files["source"] == served.txns.name
    assert (tmp_path / "log" / "model.ubj").read_bytes() == (tmp_path / "files" / "model.ubj").read_bytes()
    for key in ("threshold", "train", "validation", "test", "fraud_label_delay_days"):
        assert json.dumps(report[key], sort_keys=True) == json.dumps(files[key], sort_keys=True), key


def copy_entries(client: redis.Redis, source: str, target: str, count: int) -> list[dict[bytes, bytes]]:
    client.delete(target)
    entries = [fields for _, fields in client.xrange(source, count=count)]  # type: ignore[union-attr]
    for fields in entries:
        client.xadd(target, fields)  # type: ignore[arg-type]
    return entries


def test_columns_are_placed_by_name_and_a_repeated_transaction_keeps_its_first_entry(
    served: Served, client: redis.Redis
) -> None:
    names = list(served.pipeline.names)
    entries = copy_entries(client, served.settings.decision_stream, f"{TAG}:copy", 30)
    want = read_decision_log(client, f"{TAG}:copy", names)
    shuffled = {**entries[3]}
    values = json.loads(shuffled[b"features"])
    shuffled[b"features"] = json.dumps(dict(reversed(values.items()))).encode()
    client.xadd(f"{TAG}:copy", {**shuffled, b"shadow_score": b"0.5"})  # type: ignore[arg-type]
    first = {**entries[5], b"features": json.dumps(dict.fromkeys(names, 1.0)).encode()}
    client.xadd(f"{TAG}:copy", first)  # type: ignore[arg-type]
    client.delete(f"{TAG}:copy2")
    for _, fields in client.xrange(f"{TAG}:copy"):  # type: ignore[union-attr]
        if fields[b"txn_id"] not in (entries[3][b"txn_id"], entries[5][b"txn_id"]):
            client.xadd(f"{TAG}:copy2", fields)
    client.xadd(f"{TAG}:copy2", shuffled)  # type: ignore[arg-type]
    client.xadd(f"{TAG}:copy2", entries[5])  # type: ignore[arg-type]
    got = read_decision_log(client, f"{TAG}:copy", names, page=7)
    assert got.entries == 32 and got.duplicates == 2 and got.txn_ids == want.txn_ids
    assert np.array_equal(got.X, want.X, equal_nan=True)
    # Reordered keys still land in their columns: the shuffled copy read first gives the same row.
    reordered = read_decision_log(client, f"{TAG}:copy2", names, page=4)
    row = reordered.txn_ids.index(entries[3][b"txn_id"].decode())
    assert np.array_equal(reordered.X[row], want.X[3], equal_nan=True)
    # The dataset's rows are in event time whatever the stream's order.
    data = dataset_of(reordered, {})
    keys = list(zip(data.ts_ms.tolist(), data.txn_ids, strict=True))
    assert keys == sorted(keys) and sorted(data.txn_ids) == sorted(want.txn_ids)
    for i, txn_id in enumerate(data.txn_ids):
        assert np.array_equal(data.X[i], want.X[want.txn_ids.index(txn_id)], equal_nan=True)


def test_rfc3339_times_are_read_exactly() -> None:
    assert parse_ts_ms("2026-01-05T08:13:02.123+00:00") == 1_767_600_782_123
    assert parse_ts_ms("2026-01-05T09:13:02.999+01:00") == 1_767_600_782_999
    assert parse_ts_ms("1970-01-01T00:00:00.001Z") == 1
    with pytest.raises(ValueError, match="offset"):
        parse_ts_ms("2026-01-05T08:13:02.123")


def invoke_train(redis_url: str, stream: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    monkeypatch.setenv("FRAUD_DECISION_STREAM", stream)
    result = CliRunner().invoke(app, ["train", "--from-decisions", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "m").exists() and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fraud train: "), result.stderr
    return lines[0]


def test_an_empty_decision_stream_is_refused(
    served: Served, client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    client.delete(f"{TAG}:none", f"{TAG}:empty")
    client.xadd(f"{TAG}:empty", {"x": "1"})
    client.xtrim(f"{TAG}:empty", maxlen=0)
    for stream in (f"{TAG}:none", f"{TAG}:empty"):
        with pytest.raises(DecisionLogError, match="is empty: run the flow with FRAUD_DECISION_LOG=1"):
            read_decision_log(client, stream, list(served.pipeline.names))
    line = invoke_train(redis_url, f"{TAG}:empty", monkeypatch, tmp_path)
    assert f"the decision stream '{TAG}:empty' is empty" in line


def test_decisions_of_another_feature_schema_are_refused(
    served: Served, client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    names = list(served.pipeline.names)
    entries = copy_entries(client, served.settings.decision_stream, f"{TAG}:other", 20)
    values = json.loads(entries[-1][b"features"])
    values["amount_zscore_v2"] = values.pop(names[4])
    client.xadd(f"{TAG}:other", {**entries[-1], b"txn_id": b"other-1", b"features": json.dumps(values)})  # type: ignore[arg-type]
    with pytest.raises(DecisionLogError, match="another feature schema") as caught:
        read_decision_log(client, f"{TAG}:other", names)
    assert f"missing {names[4]}; unknown amount_zscore_v2" in str(caught.value)
    line = invoke_train(redis_url, f"{TAG}:other", monkeypatch, tmp_path)
    assert "not this pipeline's" in line and "amount_zscore_v2" in line

    # Same names, but served by a model whose version names another schema.
    client.delete(f"{TAG}:other")
    version = entries[0][b"model_version"].decode()
    client.xadd(f"{TAG}:other", {**entries[0], b"model_version": (version[:-8] + "0badf00d").encode()})  # type: ignore[arg-type]
    with pytest.raises(DecisionLogError, match="of feature schema 0badf00d"):
        read_decision_log(client, f"{TAG}:other", names, schema_hash=served.pipeline.schema_hash)
    assert len(read_decision_log(client, f"{TAG}:other", names)) == 1  # not checked without a schema


def test_decisions_without_any_label_are_refused(
    served: Served, client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input streams trimmed away (or replayed without labels): one line that says to pass --labels."""
    elsewhere = served.settings.model_copy(update={"input_stream": f"{TAG}:gone"})
    with pytest.raises(DecisionLogError, match=r"has a label in the input streams dtrain:gone:\{0\} .. "):
        decision_dataset(client, elsewhere, served.pipeline)
    monkeypatch.setenv("FRAUD_REDIS_URL", str(served.settings.redis_url_value()))
    monkeypatch.setenv("FRAUD_DECISION_STREAM", served.settings.decision_stream)
    monkeypatch.setenv("FRAUD_INPUT_STREAM", f"{TAG}:gone")
    result = CliRunner().invoke(app, ["train", "--from-decisions", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "pass --labels" in result.stderr, result.output
    both = CliRunner().invoke(app, ["train", "--from-decisions", "--transactions", str(served.txns)])
    assert both.exit_code == 2 and "does not apply with --from-decisions" in both.output, both.output
