"""End to end: the dataflow on a small generated dataset with injected bad records, real Redis."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis
from bytewax.testing import TestingSink, cluster_main, run_main
from typer.testing import CliRunner

from features.engine import FeatureEngine, FeatureVector
from features.event_files import replay
from flows.fraud import build
from fraud.cli import app
from fraud.datagen import GeneratorConfig, write_files
from models.artifact import ArtifactError, load, save
from models.serving import Decision
from service.settings import Settings
from testkit.streams import entries

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

BAD_TXNS = {
    "bad_json": '{"txn_id": "bad-1", "ts": ',
    "schema": '{"txn_id": "bad-2", "ts": "2026-01-06T10:00:00+00:00", "merchant_id": "m0001", "amount": 3}',
    "bad_amount": '{"txn_id": "bad-3", "ts": "2026-01-06T10:00:00+00:00", "card_id": "c1", "merchant_id": "m1", "amount": -5}',
    "bad_time": '{"txn_id": "bad-4", "ts": "yesterday", "card_id": "c1", "merchant_id": "m1", "amount": 5}',
    "bad_location": '{"txn_id": "bad-5", "ts": 1767693600000, "card_id": "c1", "merchant_id": "m1", "amount": 5, "lat": 95, "lon": 2}',
}
DUPLICATE = ""
LATE_ID = ""
BAD_LABEL = '{"txn_id": "never-seen", "is_fraud": true, "ts": "2026-01-07T00:00:00+00:00"}'


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, int]:
    """20 days of generated traffic with bad records spliced in, plus a duplicated transaction."""
    out = tmp_path_factory.mktemp("data")
    write_files(out, GeneratorConfig(seed=3, days=20, n_cards=150, n_merchants=60, drift_day=None))
    txns = (out / "transactions.jsonl").read_text().splitlines()
    labels = (out / "labels.jsonl").read_text().splitlines()
    n_txn, n_label = len(txns), len(labels)
    for i, line in enumerate(BAD_TXNS.values()):
        txns.insert(100 + 37 * i, line)
    global DUPLICATE, LATE_ID
    late = json.loads(txns[600])
    LATE_ID = late["txn_id"] = "late-1"
    six_hours_earlier = datetime.fromisoformat(late["ts"]) - timedelta(hours=6)
    late["ts"] = six_hours_earlier.isoformat(timespec="milliseconds")
    txns.insert(800, json.dumps(late))  # six hours older than its card's newest events: beyond lateness
    DUPLICATE = txns[499]
    txns.insert(500, DUPLICATE)  # the same transaction twice: scored once, the copy dead-lettered
    txns.insert(1500, BAD_TXNS["bad_json"])  # the same bad line again: a second dead letter, not a replay
    labels.insert(10, BAD_LABEL)
    (out / "transactions.jsonl").write_text("\n".join(txns) + "\n")
    (out / "labels.jsonl").write_text("\n".join(labels) + "\n")
    return out / "transactions.jsonl", out / "labels.jsonl", n_txn, n_label


def settings_for(dataset: tuple[Path, Path, int, int], redis_url: str, **kw: object) -> Settings:
    txns, labels, _, _ = dataset
    return Settings(
        transactions_path=txns,
        labels_path=labels,
        redis_url=redis_url,
        progress_interval_s=60,
        **kw,  # type: ignore[arg-type]
    )


def test_flow_alerts_and_dead_letters(
    dataset: tuple[Path, Path, int, int], redis_url: str, redis_client: redis.Redis
) -> None:
    settings = settings_for(dataset, redis_url, threshold=0.2)
    decisions: list[Decision] = []
    run_main(build(settings, decisions=TestingSink(decisions)))
    _, _, n_txn, n_label = dataset

    # Every valid transaction scored exactly once, the late one included (flagged, on the side output).
    ids = [d.txn.txn_id for d in decisions]
    assert len(ids) == len(set(ids)) == n_txn + 1
    late = entries(redis_client, settings.late_stream)
    assert LATE_ID in {e["txn_id"] for e in late}
    assert {e["txn_id"] for e in late} == {d.txn.txn_id for d in decisions if d.late}

    # One alert per transaction at or above the threshold, with every documented field.
    alerts = entries(redis_client, settings.alerts_stream)
    expected = {d.txn.txn_id for d in decisions if d.score >= 0.2}
    assert len(alerts) == len(expected) > 0
    assert {a["txn_id"] for a in alerts} == expected
    by_id = {d.txn.txn_id: d for d in decisions}
    names = load(settings.model_path).feature_names
    for a in alerts:
        d = by_id[a["txn_id"]]
        assert a["card_id"] == d.txn.card_id and a["merchant_id"] == d.txn.merchant_id
        assert float(a["score"]) == pytest.approx(d.score, abs=1e-6) and float(a["score"]) >= 0.2
        assert float(a["xgb_score"]) == pytest.approx(d.xgb, abs=1e-6)
        assert float(a["online_score"]) == pytest.approx(d.online, abs=1e-6)
        assert a["model_version"].startswith("xgb-") and a["ts"].endswith("+00:00")
        assert float(a["latency_ms"]) >= 0
        reasons = json.loads(a["reasons"])
        assert 1 <= len(reasons) <= settings.top_reasons
        assert all(r["contribution"] > 0 and r["feature"] in names for r in reasons)

    # Every bad record in the dead-letter stream, raw payload intact, with its reason.
    dead = entries(redis_client, settings.dlq_stream)
    got = {(d["kind"], d["reason"], d["raw"]) for d in dead}
    for reason, raw in BAD_TXNS.items():
        assert ("txn", reason, raw) in got
    assert ("label", "unknown_txn", BAD_LABEL) in got
    duplicates = [d for d in dead if d["reason"] == "duplicate_txn"]
    assert len(duplicates) == 1 and duplicates[0]["raw"] == DUPLICATE
    assert len(dead) == len(BAD_TXNS) + 3
    # Each dead letter says where it was read: the file line holding exactly its payload.
    txn_file, label_file, _, _ = dataset
    lines = {
        txn_file.name: txn_file.read_text().splitlines(),
        label_file.name: label_file.read_text().splitlines(),
    }
    for d in dead:
        name, _, line_no = d["origin"].rpartition(":")
        assert lines[name][int(line_no) - 1] == d["raw"], d
    repeated = [d for d in dead if d["reason"] == "bad_json"]
    assert (
        len(repeated) == 2 and len({d["origin"] for d in repeated}) == len({d["id"] for d in repeated}) == 2
    )

    # Nothing lost: records in = scored + dead-lettered + labels joined.
    records_in = n_txn + 1 + len(BAD_TXNS) + 1 + 1 + n_label + 1
    assert records_in == len(decisions) + len(dead) + n_label


def decide(settings: Settings, workers: int) -> list[Decision]:
    """Every decision of a run of the flow with `workers` worker threads."""
    decisions: list[Decision] = []
    flow = build(
        settings, decisions=TestingSink(decisions), alerts=TestingSink([]), dead_letters=TestingSink([])
    )
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return decisions


@pytest.mark.parametrize("workers", [1, 3])
def test_serving_features_equal_training_features(
    dataset: tuple[Path, Path, int, int], redis_url: str, workers: int
) -> None:
    """The flow (per event, keyed steps, on any number of workers) and `fraud train` (batch
    engine) give identical vectors."""
    settings = settings_for(dataset, redis_url)
    decisions = decide(settings, workers)
    txns, labels, _, _ = dataset
    from service.runtime import new_pipeline

    batch = {
        o.txn.txn_id: o.values
        for o in FeatureEngine(new_pipeline(settings)).run(replay(txns, labels))
        if isinstance(o, FeatureVector)
    }
    assert len(batch) == len(decisions)
    for d in decisions:
        want = batch[d.txn.txn_id]
        assert all(
            (math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(d.values, want, strict=True)
        ), d.txn.txn_id


def test_three_workers_score_exactly_as_one(dataset: tuple[Path, Path, int, int], redis_url: str) -> None:
    """Keys spread over three workers see their events in the same order as on one (the canonical
    order of `flows.ordering`), so River learns and predicts alike: every score is equal."""
    settings = settings_for(dataset, redis_url, online_warmup_labels=50)

    def scores(workers: int) -> dict[str, tuple[float, float, float, bool]]:
        return {d.txn.txn_id: (d.xgb, d.online, d.score, d.late) for d in decide(settings, workers)}

    one = scores(1)
    assert one == scores(3)
    assert sum(1 for _, online, _, _ in one.values() if online > 0) > len(one) // 3  # River took part


def test_flow_refuses_a_model_of_another_feature_schema(tmp_path: Path, redis_url: str) -> None:
    art = load(Settings().model_path)
    from dataclasses import replace

    save(replace(art, schema_hash="0" * 64), tmp_path)
    with pytest.raises(ArtifactError, match="fraud train"):
        build(Settings(model_path=tmp_path, redis_url=redis_url))  # type: ignore[arg-type]


def test_cli_alerts_reads_as_a_consumer_group(
    dataset: tuple[Path, Path, int, int],
    redis_url: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(dataset, redis_url, threshold=0.2)
    run_main(build(settings))
    n_alerts = redis_client.xlen(settings.alerts_stream)
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    runner = CliRunner()
    first = runner.invoke(app, ["alerts", "--json", "--limit", "3"])
    assert first.exit_code == 0, first.output
    lines = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 3 and all("txn_id" in line["fields"] for line in lines)
    rest = runner.invoke(app, ["alerts"])
    assert rest.exit_code == 0
    assert f"{n_alerts - 3} alert(s)" in rest.output
    assert redis_client.xpending(settings.alerts_stream, "fraud-cli")["pending"] == 0
    dead = runner.invoke(app, ["dead-letters"])
    assert dead.exit_code == 0, dead.output
    assert "txn:bad_json" in dead.output and f"from: {dataset[0].name}:" in dead.output


def test_reset_then_replay_writes_the_alerts_again(
    dataset: tuple[Path, Path, int, int],
    redis_url: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replaying the same file is de-duplicated; `fraud reset` clears streams and markers (the
    alerts and the drift events here: a 24-hour PSI window judges this short replay's cold start)."""
    settings = settings_for(dataset, redis_url, threshold=0.2, drift_window_hours=24, drift_min_rows=50)
    streams = (settings.alerts_stream, settings.drift_stream)
    run_main(build(settings))
    first = [redis_client.xlen(s) for s in streams]
    run_main(build(settings))
    assert [redis_client.xlen(s) for s in streams] == first and min(first) > 0  # nothing written twice
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    result = CliRunner().invoke(app, ["reset", "--yes"])
    assert result.exit_code == 0, result.output
    for stream in streams:
        assert redis_client.xlen(stream) == 0
        assert not list(redis_client.scan_iter(match=f"{stream}:sent:*"))
    run_main(build(settings))
    assert [redis_client.xlen(s) for s in streams] == first


@pytest.fixture(scope="module")
def late_worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, int, int]]:
    """A small world with a cash-out pattern from day 45 that the model never saw, and the same
    world without it (fraud-rich, so that the labels of 25 days are enough to see a change)."""
    worlds = {}
    for name, day in (("late", 45), ("none", None)):
        out = tmp_path_factory.mktemp(name)
        write_files(
            out,
            GeneratorConfig(
                seed=5, days=70, n_cards=300, n_merchants=60, drift_day=day, fraud_rate_target=0.03
            ),
        )
        worlds[name] = (out / "transactions.jsonl", out / "labels.jsonl", 0, 0)
    return worlds


def test_drift_events_reach_their_stream_once_alike_for_one_or_three_workers(
    late_worlds: dict[str, tuple[Path, Path, int, int]],
    redis_url: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flow's drift watch on a late-pattern world: a concept-drift event (XGBoost starts
    missing frauds) after the pattern's start, none in the same world without the pattern. Events
    carry every field; a replay writes none twice (the sink's markers); three workers raise the
    concept events one does (every scorer replica learns every label in the same order; their
    identical events are written once)."""

    def run(world: str, stream: str, workers: int) -> list[dict[str, str]]:
        settings = settings_for(late_worlds[world], redis_url, drift_stream=stream)
        decide(settings, workers)
        return entries(redis_client, stream)

    one = run("late", "drift:late:1w", 1)
    for e in one:
        assert set(e) == {"id", "kind", "what", "state", "value", "threshold", "since", "at", "detail"}
        assert e["state"] in ("drifting", "recovered") and e["since"] <= e["at"]
        assert e["id"].startswith(f"{e['kind']}:{e['what']}:{e['state']}:")
    assert len({e["id"] for e in one}) == len(one)
    with late_worlds["late"][0].open() as f:
        start = datetime.fromisoformat(json.loads(f.readline())["ts"]).date()
    concept = [e for e in one if e["kind"] == "concept" and e["state"] == "drifting"]
    assert concept and all((datetime.fromisoformat(e["at"]).date() - start).days >= 45 for e in concept), (
        concept
    )
    assert run("late", "drift:late:1w", 1) == one  # replayed: nothing written twice
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    monkeypatch.setenv("FRAUD_DRIFT_STREAM", "drift:late:1w")
    shown = CliRunner().invoke(app, ["drift", "--count", str(len(one))])
    assert shown.exit_code == 0, shown.output
    assert f"{len(one)} drift event(s) in drift:late:1w" in shown.stderr
    assert " concept xgboost drifting: " in shown.stdout and len(shown.stdout.splitlines()) == len(one)
    three = run("late", "drift:late:3w", 3)
    assert len({e["id"] for e in three}) == len(three)
    assert sorted(e["id"] for e in three if e["kind"] == "concept") == sorted(
        e["id"] for e in one if e["kind"] == "concept"
    )
    assert [e for e in run("none", "drift:none:1w", 1) if e["kind"] == "concept"] == []
