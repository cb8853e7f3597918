"""Feature state and the online model survive a crash through Bytewax recovery."""

from __future__ import annotations

import math
import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from features.engine import FeatureVector, LabelEvent, join_label
from features.events import Label, Transaction
from features.replay import merged_records
from flows.fraud import build
from fraud.datagen import GeneratorConfig, write_files
from fraud.settings import Settings
from models.serving import Decision

ZERO = timedelta(0)


def same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


def run(settings: Settings, items: list[object], recovery: RecoveryConfig | None = None) -> list[Decision]:
    out: list[Decision] = []
    flow = build(
        settings,
        source=TestingSource(items, batch_size=50),
        alerts=TestingSink([]),
        dead_letters=TestingSink([]),
        decisions=TestingSink(out),
    )
    run_main(flow, epoch_interval=ZERO, recovery_config=recovery)
    return out


@pytest.mark.parametrize("crash_at", [0.3, 0.75])
def test_resume_gives_the_uninterrupted_features_and_scores(tmp_path: Path, crash_at: float) -> None:
    write_files(tmp_path, GeneratorConfig(seed=11, days=12, n_cards=60, n_merchants=50, drift_day=None))
    txns, labels = tmp_path / "transactions.jsonl", tmp_path / "labels.jsonl"
    settings = Settings(
        transactions_path=txns, labels_path=labels, online_warmup_labels=50, progress_interval_s=60
    )
    records: list[object] = [(k, line, f"{k}:{n + 1}") for k, line, n in merged_records(txns, labels)]
    expected = {d.txn.txn_id: d for d in run(settings, records)}

    db = tmp_path / "recovery"
    db.mkdir()
    init_db_dir(db, 1)
    cut = int(len(records) * crash_at)
    crashing = [*records[:cut], TestingSource.ABORT(), *records[cut:]]
    recovery = RecoveryConfig(str(db))
    first = run(settings, crashing, recovery)
    assert 0 < len(first) < len(expected)  # it really stopped part-way
    second = run(settings, crashing, recovery)

    resumed = {d.txn.txn_id: d for d in first + second}  # a replayed epoch may score a txn twice
    assert resumed.keys() == expected.keys()
    for txn_id, d in resumed.items():
        e = expected[txn_id]
        assert same(d.values, e.values), txn_id
        assert (d.xgb, d.online, d.score) == (e.xgb, e.online, e.score), txn_id
    assert any(d.online > 0 for d in second)  # the online model was restored, not restarted


def test_flow_entity_keys_are_dropped_after_their_retention() -> None:
    """EntityLogic schedules a wall-clock notification one retention after its last event."""
    from datetime import UTC, datetime

    from features.engine import Pipeline
    from features.events import Transaction
    from flows.steps import EntityLogic
    from fraud.runtime import new_pipeline

    pipeline: Pipeline = new_pipeline(Settings())
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    row, _ = pipeline.start(Transaction("t1", now_ms, "c1", "m1", 5.0))
    logic = EntityLogic(pipeline, 0, None)
    _, discard = logic.on_batch([row])
    assert not discard and logic.state is not None
    wake = logic.notify_at()
    assert wake is not None and (wake - datetime.now(UTC)).total_seconds() > 29 * 86_400
    assert logic.on_notify() == ([], False)  # fired early (e.g. after a restart): still fresh, kept
    days = pipeline.plans[0].retention_ms // 86_400_000 + 1  # the card's longest look-back, and a day
    logic.state[0] -= days * 1440  # the key's time origin (minutes): as if its only event were that old
    assert logic.on_notify() == ([], True)


def _make_recovery(directory: str, start: Any) -> None:
    from flows.runner import recovery_config

    start.wait(60)  # all processes reach recovery_config at the same moment, as a cluster's do
    recovery_config(Path(directory), 4)


def test_processes_starting_together_share_one_recovery_directory(tmp_path: Path) -> None:
    """The processes of a cluster all create the recovery partitions on start: exactly one must."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for attempt in range(3):
        directory = tmp_path / f"r{attempt}"
        start = ctx.Barrier(4)
        procs = [ctx.Process(target=_make_recovery, args=(str(directory), start)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        assert sorted(f.name for f in directory.glob("part-*")) == [f"part-{i}.sqlite3" for i in range(4)]


def test_pending_step_keeps_the_scored_vector_until_its_label() -> None:
    """The vector a transaction was scored with waits in its own small key, survives a snapshot,
    and goes to the online model with the label; the scorer itself keeps nothing per transaction."""
    from flows.ordering import INF, Watermark
    from flows.routing import set_workers
    from flows.steps import PendingLogic, ScoringLogic
    from fraud.runtime import load_runtime
    from models.serving import LabelledVector

    settings = Settings()
    rt = load_runtime(settings, need_redis=False)
    pipeline = rt.pipeline
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    txn = Transaction("t1", now_ms, "c1", "m1", 5.0, seq=1)
    row, entry = pipeline.start(txn)
    for i in range(len(pipeline.plans)):
        pipeline.observe(i, pipeline.plans[i].new_state(), row)
    logic = PendingLogic(pipeline, timedelta(days=60), None)
    (vector,), discard = logic.on_batch([row])
    assert isinstance(vector, FeatureVector) and not discard
    assert vector.values == pipeline.assemble(row)
    resumed = PendingLogic(pipeline, timedelta(days=60), logic.snapshot())
    label = join_label("t1", entry, Label("t1", True, now_ms + 1, seq=2))
    assert isinstance(label, LabelEvent)
    (learned,), discard = resumed.on_batch([label])
    assert isinstance(learned, LabelledVector) and discard
    assert learned.is_fraud and same(list(learned.values), vector.values)
    assert resumed.on_batch([label]) == ([], True)  # nothing held any more: nothing to learn

    set_workers(1)
    scoring = ScoringLogic(rt.new_scorer, None)
    assert scoring.on_batch([vector, learned]) == ([], False)  # held until the watermark passes
    decisions, _ = scoring.on_batch([Watermark(0, INF, 0)])
    assert [d.txn.txn_id for d in decisions] == ["t1"]
    assert scoring.scorer.online.n_learned == 1
    # The model, and nothing held: nothing per transaction in the scorer's one key.
    model, held, relay = scoring.snapshot()
    assert model == (pickle.dumps(scoring.scorer.online),) and held == [] and relay.out == INF
    assert ScoringLogic(rt.new_scorer, scoring.snapshot()).scorer.online.n_learned == 1
    # A snapshot from before the canonical order (the models alone) still resumes.
    assert ScoringLogic(rt.new_scorer, model).scorer.online.n_learned == 1
