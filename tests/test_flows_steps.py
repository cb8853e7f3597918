"""The stateful steps of `flows.steps`, each run on a tiny dataflow of its own (`flows.ordering.ordered`
over a `TestingSource` of a few items, `run_main`), the way Bytewax tests its operators; and the
logic classes called directly where a test needs to reach into a key (retention, snapshots).

How the steps are wired together is `flows.fraud.build`; the whole flow is tests/test_flow.py.
"""

from __future__ import annotations

import gc
import json
import pickle
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import bytewax.operators as op
import msgspec
import numpy as np
import pytest
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from prometheus_client import REGISTRY

from features.engine import FeaturePipeline, FeatureRow, FeatureVector, LabelEvent, TxnEntry, join_label
from features.events import DeadLetter, Label, Transaction, encode
from features.privacy import card_token
from features.table import COMPILED, DictTable, Table
from flows.expiry import Arrivals, Expired, Expiry
from flows.ordering import KeyedStep, Stage, ordered
from flows.routing import Shards, Workers
from flows.shards import FullState, Manifest, StateFiles
from flows.stamping import INF, NEG, Watermark, make_seq, partition_code, stamp
from flows.steps import (
    EntityLogic,
    IndexLogic,
    PendingLogic,
    Quarantined,
    SavedLabel,
    ScoringLogic,
    chain_filters,
    dead_letter_of,
    decoder,
    entity_key,
    labelled,
    partitions,
    pending_key,
    scorer_key,
    to_every_replica,
    txn_key,
)
from models.serving import Decision, LabelledVector, PendingVectors
from service.runtime import YOUNG_COLLECTION_AT, Runtime, load_runtime, new_pipeline
from service.settings import Settings

NOW_MS = int(datetime.now(UTC).timestamp() * 1000)
TTL = timedelta(days=60)
SHARDS = Shards()  # the default count


@pytest.fixture(scope="module")
def pipeline() -> FeaturePipeline:
    return new_pipeline(Settings())


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return load_runtime(Settings(), need_redis=False)


def txn(txn_id: str, seq: int, card: str = "c1", minutes: int = 0, amount: float = 5.0) -> Transaction:
    return Transaction(txn_id, NOW_MS + minutes * 60_000, card, "m1", amount, seq=seq)


def run_step(
    items: list[Any], key: Callable[[Any], str], logic: Callable[[Any], Any], batch_size: int = 1, **how: Any
) -> list[Any]:
    """What one ordered step emits for `items`, keyed by `key`, in one worker."""
    out: list[Any] = []
    flow = Dataflow("step")
    keyed = op.key_on("key", op.input("in", flow, TestingSource(items, batch_size)), lambda _: "")
    step = ordered("step", keyed, logic=logic, workers=Workers(1), key=key, **how)
    op.output("out", op.key_rm("unkey", step), TestingSink(out))
    run_main(flow)
    return out


def chained(pipeline: FeaturePipeline, *txns: Transaction) -> list[FeatureRow]:
    """Rows as they leave the entity chain: every plan's features added (each txn on fresh state)."""
    rows = []
    for t in txns:
        row, _ = pipeline.start(t)
        for plan in pipeline.plans:
            pipeline.observe(plan, plan.new_state(), row)
        rows.append(row)
    return rows


# --- index ----------------------------------------------------------------------------------------


def test_index_dead_letters_a_duplicate_and_joins_labels_once(pipeline: FeaturePipeline) -> None:
    items = [
        txn("t1", 1),
        txn("t1", 2, amount=9.0),  # the same id again
        Label("t1", True, NOW_MS + 1, seq=3),
        Label("t1", False, NOW_MS + 2, seq=4),  # labelled already
        Label("t9", True, NOW_MS + 3, seq=5),  # never seen
    ]
    out = run_step(items, txn_key(SHARDS), partial(IndexLogic, pipeline, None))
    row, dup, joined, *dead = out
    assert isinstance(row, FeatureRow) and row.txn.amount == 5.0
    assert row.keys == tuple(p.key_of(items[0]) for p in pipeline.plans)  # type: ignore[arg-type]
    assert isinstance(dup, DeadLetter) and (dup.reason, dup.txn_id) == ("duplicate_txn", "t1")
    assert json.loads(dup.raw)["amount"] == 9.0  # the copy, as received
    assert isinstance(joined, LabelEvent) and joined.is_fraud and joined.txn_ts_ms == NOW_MS
    assert joined.keys == row.keys
    assert [(d.reason, d.txn_id) for d in dead] == [("duplicate_label", "t1"), ("unknown_txn", "t9")]


@pytest.mark.parametrize("with_files", [True, False])
def test_an_index_shard_reading_several_partitions_parks_a_label_until_the_watermark_passes_it(
    pipeline: FeaturePipeline, tmp_path: Path, with_files: bool
) -> None:
    """With several partitions a label may come before its transaction (read from another
    partition): the shard parks it, and so any later label of the same transaction, and applies
    them in `seq` order once the watermark passes them (`unpark`), joining or dead-lettering
    each then. Parked labels live in the shard's entries, so its snapshot (files or a pickled
    copy) keeps them with their whole seq. With one partition a label is applied at once."""
    base = make_seq(NOW_MS, partition_code("fraud:in:{0}"), 0)
    files = StateFiles(tmp_path, "index") if with_files else None
    index = IndexLogic(pipeline, files, None, parks=True)
    early, again, stray = (
        Label("t1", True, NOW_MS + 5, seq=base + 10),
        Label("t1", False, NOW_MS + 6, seq=base + 12),
        Label("t9", True, NOW_MS + 7, seq=base + 11),
    )
    assert index.apply([stray]) == [] and index.apply([early]) == []  # another partition's, smaller seq
    assert index.parked() == early  # the smallest, whatever the order they came in
    (row,) = index.apply([txn("t1", base + 2)])  # its transaction, from the partition behind
    assert isinstance(row, FeatureRow)
    assert index.apply([again]) == []  # t1 has a parked label: this one waits behind it
    assert index.unpark(base + 9) == [] and index.parked() == early
    resumed = IndexLogic(pipeline, files, pickle.loads(pickle.dumps(index.snapshot())), parks=True)
    assert resumed.parked() == early and len(resumed.waiting) == 3
    joined, unknown = resumed.unpark(base + 11)
    assert isinstance(joined, LabelEvent) and joined.seq == early.seq and joined.is_fraud
    assert isinstance(unknown, DeadLetter) and (unknown.reason, unknown.txn_id) == ("unknown_txn", "t9")
    assert resumed.parked() == again
    (dup,) = resumed.unpark(None)  # the end of the input: whatever is left
    assert isinstance(dup, DeadLetter) and dup.reason == "duplicate_label"
    assert resumed.parked() is None and sorted(resumed.items.keys()) == ["t1"]
    again_resumed = IndexLogic(pipeline, files, pickle.loads(pickle.dumps(resumed.snapshot())), parks=True)
    assert again_resumed.parked() is None and sorted(again_resumed.items.keys()) == ["t1"]
    one = IndexLogic(pipeline, None, None)  # one partition: the order is already the canonical one
    assert [d.reason for d in one.apply([stray])] == ["unknown_txn"]  # type: ignore[union-attr]
    assert one.parked() is None


def test_index_and_pending_read_what_they_wrote_while_a_snapshot_holds_their_table(
    pipeline: FeaturePipeline,
) -> None:
    """Without files a shard lends its table to its snapshot and copies it before its next change
    while that snapshot lives (Bytewax pickling it later): a batch's later items must still see
    what its earlier items wrote to the copy."""
    index = IndexLogic(pipeline, None, None)
    index.apply([txn("t0", 1)])
    held = index.snapshot()
    out = index.apply([txn("t1", 2), txn("t1", 3, amount=9.0)])
    assert isinstance(out[1], DeadLetter) and out[1].reason == "duplicate_txn"
    assert isinstance(held, FullState) and list(held.items.keys()) == ["t0"]

    (row,) = chained(pipeline, txn("t1", 1))
    _, entry = pipeline.start(row.txn)
    label = join_label("t1", entry, Label("t1", True, NOW_MS + 1, seq=2))
    pending = PendingLogic(pipeline, None, None)
    pending.apply(chained(pipeline, txn("t0", 1)))
    held = pending.snapshot()
    joined = pending.apply([label, row])  # the label overtook its row: held, then joined
    assert [type(o) for o in joined] == [FeatureVector, LabelledVector]
    assert isinstance(held, FullState) and list(held.items.keys()) == ["t0"]


# --- entity chain ---------------------------------------------------------------------------------


def test_entity_step_adds_its_features_and_quarantines_a_raising_item(
    pipeline: FeaturePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = pipeline.plans[0]
    assert card.entity.name == "card"
    rows = [pipeline.start(t)[0] for t in (txn("t1", 1), txn("t2", 2, minutes=1), txn("bad", 3, minutes=2))]
    observe = FeaturePipeline.observe

    def observe_(self: FeaturePipeline, plan: Any, state: Any, row: FeatureRow) -> None:
        if row.txn.txn_id == "bad":
            raise RuntimeError("boom")
        observe(self, plan, state, row)

    monkeypatch.setattr(FeaturePipeline, "observe", observe_)
    first, second, bad = run_step(rows, entity_key(card, SHARDS), partial(EntityLogic, pipeline, card, None))
    count_1h = card.names.index("count_by_card_1h")
    assert [len(r.parts) for r in (first, second)] == [1, 1]
    assert (first.parts[0][count_1h], second.parts[0][count_1h]) == (1.0, 2.0)  # one key's history
    assert isinstance(bad, Quarantined) and (bad.txn_id, bad.seq) == ("bad", 3)
    assert bad.dead.reason == "internal_error" and "card_features" in bad.dead.detail
    assert bad.keys == (None,) * len(pipeline.plans)  # passes the rest of the chain untouched


def test_flow_entity_keys_are_dropped_after_their_retention(pipeline: FeaturePipeline) -> None:
    """An entity shard holds one hourly timer whatever its number of keys, and its sweep drops a
    key only once both its last arrival (wall clock) and its newest event time are a retention
    old: a fast replay of old events keeps every key, and so does a key seen again since."""
    card = pipeline.plans[0]
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    rows = [pipeline.start(Transaction("t0", now_ms, "c0", "m1", 5.0))[0]]
    logic = EntityLogic(pipeline, card, None, None)
    logic.apply(rows[:1])
    wake = logic.wake_at()
    assert wake is not None and 3590 < (wake - datetime.now(UTC)).total_seconds() <= 3600
    assert logic.wake() == ([], False) and "card:c0" in logic.items  # fresh: kept
    days = card.retention_ms // 86_400_000 + 1  # the card's longest look-back, and a day
    logic.items["card:c0"][0] -= days * 1440  # the key's time origin (minutes): its only event that old
    assert logic.wake() == ([], False) and "card:c0" in logic.items  # seen a moment ago: a replay, kept
    logic.seen["card:c0"] -= days * 1440  # and last seen that long ago
    logic.snapshot()
    assert logic.wake() == ([], False) and "card:c0" not in logic.items and "card:c0" not in logic.seen
    snap = logic.snapshot()
    assert isinstance(snap, FullState) and "card:c0" not in snap.items  # its snapshot forgets it too


def test_entity_shard_snapshots_rebuild_every_key(pipeline: FeaturePipeline, tmp_path: Path) -> None:
    """An entity shard saves only the keys an epoch changed (its delta), and its snapshot, with or
    without files, rebuilds the states: the next event sees the same history either way."""
    card = pipeline.plans[0]
    key = entity_key(card, SHARDS)
    cards = [c for c in (f"c{j}" for j in range(2000)) if SHARDS.of(f"card:{c}") == SHARDS.of("card:c0")][:3]
    assert len(cards) == 3  # three cards of one shard
    rows = [pipeline.start(txn(f"t{i}", i + 1, card=cards[i % 3], minutes=i))[0] for i in range(30)]
    shard = key(rows[0])
    assert {key(r) for r in rows} == {shard}
    for files in (None, StateFiles(tmp_path, "card")):
        logic = EntityLogic(pipeline, card, files, None)
        logic.apply(rows[:-1])
        before = {k: state.snapshot() for k, state in logic.items.items()}
        first = logic.snapshot()
        logic.apply(rows[-1:])  # touches one key: the next delta holds it alone
        snap = logic.snapshot()
        if files is None:  # `first` is still held (as Bytewax holds one until it pickles it)
            assert isinstance(first, FullState) and isinstance(snap, FullState)
            assert first.items is not snap.items  # so the saved copies were copied, not changed
            back = EntityLogic(pipeline, card, None, first)
            assert {k: state.snapshot() for k, state in back.items.items()} == before
            assert before != {k: state.snapshot() for k, state in logic.items.items()}
            saved = snap.items
            del snap, first  # dropped, as Bytewax drops them with recovery off: no copy
            logic.apply(rows[:1])
            snap = logic.snapshot()
            assert isinstance(snap, FullState) and snap.items is saved
        resumed = EntityLogic(pipeline, card, files, snap)
        assert set(resumed.items) == set(logic.items) and resumed.shard == shard
        for k, state in logic.items.items():
            assert resumed.items[k].snapshot() == state.snapshot(), k
        if files is not None:
            assert isinstance(first, Manifest) and isinstance(snap, Manifest)
            assert len(snap.segments) == 1 and snap.segments[0][2] > first.segments[0][2]


# --- pending --------------------------------------------------------------------------------------


def test_pending_holds_the_vector_and_sends_it_with_the_label(pipeline: FeaturePipeline) -> None:
    """The vector is kept as float32 (what XGBoost scores; half the memory): River learns those
    values, as it does in batch mode (`models.serving.PendingVectors`)."""
    (row,) = chained(pipeline, txn("t1", 1, amount=12.34))  # 12.34 is not a float32
    _, entry = pipeline.start(row.txn)
    label = join_label("t1", entry, Label("t1", True, NOW_MS + 1, seq=2))
    assert isinstance(label, LabelEvent)
    before = PendingLogic.held  # the `fraud_pending_transactions` gauge's count
    logic = PendingLogic(pipeline, None, None)
    assert len(logic.apply([row])) == 1 and PendingLogic.held == before + 1  # one vector waits
    assert len(logic.apply([label])) == 1 and PendingLogic.held == before  # its label took it
    vector, learned = run_step([row, label], pending_key(SHARDS), partial(PendingLogic, pipeline, None))
    assert isinstance(vector, FeatureVector) and vector.values == pipeline.assemble(row)
    assert isinstance(learned, LabelledVector) and (learned.txn_id, learned.is_fraud) == ("t1", True)
    as32 = np.asarray(vector.values, dtype=np.float32)
    assert np.array_equal(np.asarray(learned.values), as32, equal_nan=True)
    assert not np.array_equal(np.asarray(learned.values, dtype=np.float64), vector.values, equal_nan=True)
    held = PendingVectors(10**9)
    held.hold(vector)
    batch = held.join(label)
    assert batch is not None and bytes(batch.values) == bytes(learned.values)  # the same in batch mode


def test_a_label_waiting_for_its_row_is_saved_in_the_state_files_with_its_whole_seq(
    pipeline: FeaturePipeline, tmp_path: Path
) -> None:
    """A label skips the entity chain, so it can reach `pending` before its row and wait there
    over an epoch close. A real `seq` is wider than msgpack's 64-bit integers (the tests above use
    small ones): saving it to the state files once raised OverflowError and stopped the flow (in
    a cluster, as a "Send thread panic")."""
    seq = make_seq(NOW_MS, partition_code("fraud:in:{0}"), 12_345)
    assert seq > 1 << 64
    t = Transaction("t1", NOW_MS, "c1", "m1", 5.0, seq=seq - 1)
    row, entry = pipeline.start(t)
    for plan in pipeline.plans:
        pipeline.observe(plan, plan.new_state(), row)
    early = join_label("t1", entry, Label("t1", True, NOW_MS + 1, seq=seq))
    assert isinstance(early, LabelEvent)
    files = StateFiles(tmp_path, "pending")
    logic = PendingLogic(pipeline, files, None)
    assert logic.apply([early]) == []  # waits for its row
    manifest = logic.snapshot()
    assert isinstance(manifest, Manifest)
    resumed = PendingLogic(pipeline, files, pickle.loads(pickle.dumps(manifest)))
    assert resumed.items["t1"] == early
    vector, learned = resumed.apply([row])
    assert isinstance(vector, FeatureVector) and isinstance(learned, LabelledVector)
    assert learned.seq == seq and learned.is_fraud and list(resumed.items) == []
    for negative in (-seq, -1):  # the split keeps any sign (a seq is never negative today)
        e = msgspec.structs.replace(early, seq=negative)
        assert SavedLabel.of(e).label() == e


def test_pending_step_keeps_the_scored_vector_until_its_label(runtime: Runtime) -> None:
    """The vector a transaction was scored with waits in its own small key, survives a snapshot,
    and goes to the online model with the label; the scorer itself keeps nothing per transaction."""
    rt = runtime
    pipeline = rt.pipeline
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    t = Transaction("t1", now_ms, "c1", "m1", 5.0, seq=1)
    row, entry = pipeline.start(t)
    for plan in pipeline.plans:
        pipeline.observe(plan, plan.new_state(), row)
    logic = PendingLogic(pipeline, None, None)
    (vector,) = logic.apply([row])
    assert isinstance(vector, FeatureVector) and list(logic.items) == ["t1"]
    assert vector.values == pipeline.assemble(row)
    resumed = PendingLogic(pipeline, None, logic.snapshot())
    label = join_label("t1", entry, Label("t1", True, now_ms + 1, seq=2))
    assert isinstance(label, LabelEvent)
    _, entry2 = pipeline.start(Transaction("t2", now_ms, "c2", "m1", 7.0, seq=3))
    early = join_label("t2", entry2, Label("t2", False, now_ms + 2, seq=4))  # before its row
    assert isinstance(early, LabelEvent)
    counted = {
        v: REGISTRY.get_sample_value("fraud_labels_total", {"is_fraud": v}) or 0.0 for v in ("true", "false")
    }
    (learned,) = resumed.apply([label, early])
    assert isinstance(learned, LabelledVector) and list(resumed.items) == ["t2"]
    assert learned.is_fraud and np.array_equal(learned.values, vector.values, equal_nan=True)
    for v, more in (("true", 1.0), ("false", 1.0)):  # every label that reached the step, on the metric
        assert REGISTRY.get_sample_value("fraud_labels_total", {"is_fraud": v}) == counted[v] + more

    scoring = ScoringLogic(rt.new_scorer, None)
    (decision,) = scoring.apply([vector, learned])
    assert isinstance(decision, Decision) and decision.txn.txn_id == "t1"
    assert scoring.scorer.online.n_learned == 1
    # The models, the drift watch and the versions served: nothing per transaction in a replica.
    champion = scoring.scorer.champion
    assert scoring.snapshot() == (
        pickle.dumps(scoring.scorer.online),
        pickle.dumps(scoring.scorer.monitor),
        *(champion.version, champion.digest, "", "", "", ""),
    )
    assert len(champion.digest) == 64
    assert ScoringLogic(rt.new_scorer, scoring.snapshot()).scorer.online.n_learned == 1

    # FRAUD_DRIFT_WATCH=false: no watch, the same decision.
    off = ScoringLogic(load_runtime(Settings(drift_watch=False), need_redis=False).new_scorer, None)
    (same,) = off.apply([vector, learned])
    assert off.scorer.monitor is None and scoring.scorer.monitor is not None
    assert (same.xgb, same.online, same.score) == (decision.xgb, decision.online, decision.score)
    back_on = ScoringLogic(rt.new_scorer, off.snapshot()).scorer
    assert back_on.online.n_learned == 1 and back_on.monitor is not None  # the watch starts afresh
    assert back_on.monitor.concept.n == 0 and scoring.scorer.monitor.concept.n == 1
    resumed_on = ScoringLogic(rt.new_scorer, scoring.snapshot()).scorer.monitor
    assert resumed_on is not None and resumed_on.concept.n == 1
    other = load_runtime(Settings(drift_label_window=200), need_redis=False).new_scorer
    assert ScoringLogic(other, scoring.snapshot()).scorer.monitor.concept.n == 0  # other settings


def test_the_online_learning_metrics_count_each_label_and_its_time(runtime: Runtime) -> None:
    """`fraud_online_labels_learned` grows by the labels a batch taught River, and
    `fraud_online_learn_seconds` by the time that took: never more than the batch's own."""
    import time

    values = array("f", [0.5] * len(runtime.pipeline.names))
    labels = [LabelledVector(f"t{i}", i % 2 == 0, values, i, NOW_MS + i) for i in range(3)]
    scoring = ScoringLogic(runtime.new_scorer, None)

    def metric(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    learned, seconds = metric("fraud_online_labels_learned_total"), metric("fraud_online_learn_seconds_total")
    started = time.perf_counter()
    assert scoring.apply(list(labels)) == []  # labels alone decide nothing
    took = time.perf_counter() - started
    assert scoring.scorer.online.n_learned == 3
    assert metric("fraud_online_labels_learned_total") == learned + 3
    assert 0 < metric("fraud_online_learn_seconds_total") - seconds <= took


def test_pending_keeps_a_label_that_overtook_its_row(pipeline: FeaturePipeline) -> None:
    """Most labels skip the entity chain, so one can reach `pending` while its row is still held
    in the chain: it waits (through a snapshot too) and goes out with the row, keeping its own
    `seq`; a row quarantined in the chain takes its waiting label with it."""
    (row,) = chained(pipeline, txn("t1", 1))
    _, entry = pipeline.start(row.txn)
    label = join_label("t1", entry, Label("t1", False, NOW_MS + 1, seq=7))
    assert isinstance(label, LabelEvent)
    logic = PendingLogic(pipeline, None, None)
    assert logic.apply([label]) == [] and logic.items == {"t1": label}
    resumed = PendingLogic(pipeline, None, pickle.loads(pickle.dumps(logic.snapshot())))
    vector, learned = resumed.apply([row])
    assert isinstance(vector, FeatureVector) and isinstance(learned, LabelledVector)
    assert (learned.txn_id, learned.is_fraud, learned.seq) == ("t1", False, 7)
    assert learned.ts_ms == NOW_MS + 1  # the label's time: what a drift event it causes is dated by
    assert np.array_equal(learned.values, vector.values, equal_nan=True) and not resumed.items

    waiting = PendingLogic(pipeline, None, None)
    waiting.apply([label])
    lost = Quarantined("t1", 1, DeadLetter("txn", "internal_error", "boom", "{}", "t1", ""), ())
    assert waiting.apply([lost]) == [lost] and not waiting.items


def test_only_labels_that_change_an_entity_go_through_the_chain(pipeline: FeaturePipeline) -> None:
    needs_chain, skips_chain = chain_filters(pipeline)
    row, entry = pipeline.start(txn("t1", 1))
    fraud = join_label("t1", entry, Label("t1", True, NOW_MS + 1, seq=2))
    entry.labelled = False
    legit = join_label("t1", entry, Label("t1", False, NOW_MS + 1, seq=2))
    mark = Watermark(0, 5, 0)
    assert any(plan.uses_labels for plan in pipeline.plans)  # the default features count fraud labels
    assert [needs_chain(("", x)) for x in (row, fraud, legit, mark)] == [True, True, False, True]
    assert [skips_chain(("", x)) for x in (row, fraud, legit, mark)] == [False, False, True, True]


# --- scoring --------------------------------------------------------------------------------------


def test_scoring_decides_in_canonical_order(runtime: Runtime) -> None:
    """Vectors arriving out of order in one batch are decided in `seq` order, once the watermark
    has passed them (the online model's state depends on that order)."""
    txns = [txn(f"t{s}", s, card=f"c{s % 3}", minutes=s) for s in (4, 1, 3, 2, 5)]
    vectors: list[Any] = [
        FeatureVector(r.txn, runtime.pipeline.assemble(r), False) for r in chained(runtime.pipeline, *txns)
    ]
    snapped = REGISTRY.get_sample_value("fraud_snapshot_seconds_total", {"step": "step"}) or 0.0
    out = run_step(
        [*vectors, Watermark(0, INF, 0)],
        scorer_key(SHARDS),
        partial(ScoringLogic, runtime.new_scorer),
        batch_size=len(vectors) + 1,
        per_worker=True,
        everywhere=to_every_replica,
        last=True,
    )
    assert all(isinstance(d, Decision) for d in out)
    assert [d.txn.txn_id for d in out] == ["t1", "t2", "t3", "t4", "t5"]
    assert (REGISTRY.get_sample_value("fraud_step_seconds_total", {"step": "step"}) or 0.0) > 0.0
    # run_main closes an epoch at the end at least: this run's replica snapshot was timed
    assert (REGISTRY.get_sample_value("fraud_snapshot_seconds_total", {"step": "step"}) or 0.0) > snapped


def test_scoring_spreads_vectors_over_worker_replicas_that_all_learn_every_label(runtime: Runtime) -> None:
    """Three workers: every vector scored once, by one of several replicas; every replica learns
    every label, before the vectors that come after it in the canonical order; the scores are
    those of one replica that saw everything."""
    pipeline = runtime.pipeline
    txns = [txn(f"t{s}", 2 * s, card=f"c{s % 7}", minutes=s) for s in range(1, 41)]
    rows = chained(pipeline, *txns)
    vectors: list[Any] = [FeatureVector(r.txn, pipeline.assemble(r), False) for r in rows]
    labels: list[Any] = [
        LabelledVector(v.txn.txn_id, i % 3 == 0, v.values, v.seq + 11) for i, v in enumerate(vectors[:20])
    ]
    items = [*vectors, *labels, *(Watermark(j, INF, 0) for j in range(3))]
    replicas: list[Counting] = []

    class Counting(ScoringLogic):
        decided = 0

        def apply(self, events: list[Any]) -> list[Any]:
            out = super().apply(events)
            self.decided += sum(isinstance(d, Decision) for d in out)
            return out

    def replica(resume: Any) -> ScoringLogic:
        replicas.append(Counting(runtime.new_scorer, resume))
        return replicas[-1]

    out: list[Any] = []
    flow = Dataflow("replicas")
    keyed = op.key_on("key", op.input("in", flow, TestingSource(items, 8)), lambda _: "")
    step = ordered(
        "score", keyed, logic=replica, workers=Workers(3), key=scorer_key(SHARDS), per_worker=True, everywhere=to_every_replica,
        last=True,
    )  # fmt: skip
    op.output("out", op.key_rm("unkey", step), TestingSink(out))
    cluster_main(flow, [], 0, worker_count_per_proc=3)
    assert sorted(d.txn.txn_id for d in out) == sorted(v.txn.txn_id for v in vectors)
    assert len(replicas) == 3 and all(r.scorer.online.n_learned == 20 for r in replicas)
    assert sum(r.decided for r in replicas) == 40 and max(r.decided for r in replicas) < 30  # spread
    alone = ScoringLogic(runtime.new_scorer, None)
    one = {
        d.txn.txn_id: (d.xgb, d.online) for d in alone.apply(sorted([*vectors, *labels], key=lambda x: x.seq))
    }
    assert {d.txn.txn_id: (d.xgb, d.online) for d in out} == one


# --- decoder --------------------------------------------------------------------------------------


def test_decoder_tokenizes_card_ids_in_transactions_labels_and_dead_letters() -> None:
    token = card_token(b"step-test-key")
    raw = encode(Transaction("t1", NOW_MS, "4111-CARD", "m1", 5.0)).decode()
    records = [
        ("txn", raw, "in#1"),
        (
            "label",
            json.dumps({"txn_id": "t1", "is_fraud": True, "ts": NOW_MS, "card_id": "4111-CARD"}),
            "in#2",
        ),
        ("txn", json.dumps({"txn_id": "t2", "card_id": "4111-CARD"}), "in#3"),  # no amount: dead letter
    ]
    out: list[Any] = []
    flow = Dataflow("decode")
    op.output(
        "out",
        op.map("decode", op.input("in", flow, TestingSource(records)), decoder(token)),
        TestingSink(out),
    )
    run_main(flow)
    t, label, dead = out
    assert isinstance(t, Transaction) and t.card_id == token("4111-CARD") != "4111-CARD"
    assert isinstance(label, Label) and isinstance(dead, DeadLetter)
    for e in out:
        assert "4111-CARD" not in e.raw and token("4111-CARD") in e.raw, e


# --- expiry ---------------------------------------------------------------------------------------


def test_arrivals_keep_each_buckets_ids_and_hand_the_due_ones_back_oldest_first() -> None:
    arrivals = Arrivals()
    for bucket, txn_id in ((7, "t1"), (7, "t2"), (8, "té3"), (9, "t4")):
        arrivals.add(bucket, txn_id)
    assert arrivals.oldest() == 7 and len(arrivals) == 3
    assert list(arrivals.due(8)) == [(7, "t1"), (7, "t2"), (8, "té3")]
    assert list(arrivals.due(8)) == [] and arrivals.oldest() == 9
    arrivals.add(3, "t5")  # a rebuild adds in any order: sort puts the oldest first again
    arrivals.sort()
    assert arrivals.oldest() == 3 and list(arrivals.due(100)) == [(3, "t5"), (9, "t4")]
    assert arrivals.oldest() is None
    assert Expiry(timedelta(days=60)).seconds == 3600 and Expiry(timedelta(hours=1)).seconds == 60
    assert Expiry(timedelta(minutes=2), bucket_s=60).buckets == 3


def test_an_index_shard_expires_its_entries_at_its_next_batch_or_its_timer_and_after_a_resume(
    pipeline: FeaturePipeline,
) -> None:
    """An entry lives the TTL after the bucket it arrived in; the shard drops it at its first
    batch after that (the `Expired` first, for `pending`), or when its one timer fires; a labelled
    entry keeps its bucket; a resumed shard rebuilds its buckets from its entries; a later entry
    of an expired id is not dropped with the old bucket. No key or timer per transaction."""
    now = [6_000_000.0]
    expiry = Expiry(timedelta(minutes=2), bucket_s=60, clock=lambda: now[0])
    index = IndexLogic(pipeline, None, None, expiry)
    assert index.wake_at() is None  # nothing held: no timer
    out = index.apply([txn("t1", 1), txn("t2", 2), Label("t1", True, NOW_MS + 1, seq=3)])
    assert [type(o).__name__ for o in out] == ["FeatureRow", "FeatureRow", "LabelEvent"]
    assert index.items["t1"] == labelled(100_000)  # bucket 100,000 (6,000,000-6,000,060 s)
    due = datetime.fromtimestamp((100_000 + 3) * 60, UTC)
    assert index.wake_at() == due
    now[0] += 120
    index.apply([txn("t3", 3)])  # not due yet: nothing dropped
    assert sorted(index.items.keys()) == ["t1", "t2", "t3"] and index.wake_at() == due
    resumed = IndexLogic(pipeline, None, pickle.loads(pickle.dumps(index.snapshot())), expiry)
    now[0] += 60  # bucket 100,000 is due: t1 and t2 go, t3 (bucket 100,002) stays
    out = resumed.apply([txn("t1", 4), Label("t2", True, NOW_MS + 5, seq=5)])
    assert sorted(out[:2], key=str) == [Expired("t1"), Expired("t2")]  # (a bucket's ids in any order)
    assert type(out[2]) is FeatureRow and out[2].txn.txn_id == "t1"  # a new transaction of the same id
    assert type(out[3]) is DeadLetter and out[3].reason == "unknown_txn"  # t2 expired
    assert sorted(resumed.items.keys()) == ["t1", "t3"]
    assert resumed.wake_at() == datetime.fromtimestamp((100_002 + 3) * 60, UTC)
    now[0] += 3600
    assert resumed.wake() == ([Expired("t3"), Expired("t1")], False)  # the timer: no batch needed
    assert resumed.wake_at() is None and not resumed.items
    assert Expired("t1").seq == NEG  # outside the canonical order: before every event


def test_an_expired_transaction_leaves_the_index_and_pending_and_its_label_is_refused(
    pipeline: FeaturePipeline,
) -> None:
    """stamp -> index -> pending with a clock that jumps past the TTL between two batches: the
    transactions' entries and vectors are dropped, and their labels become `unknown_txn` dead
    letters."""
    now = [time.time()]  # near the real clock: the shards' timers (real time) stay a day away
    ttl = timedelta(days=1)

    def items() -> Any:
        yield txn("t1", 0)
        yield txn("t2", 0, card="c2")
        now[0] += ttl.total_seconds() + 3600
        yield Label("t1", True, NOW_MS + 5)
        yield Label("t2", True, NOW_MS + 6)

    out: list[Any] = []
    flow = Dataflow("expiry")
    expiry = Expiry(ttl, clock=lambda: now[0])
    stamped = stamp("stamp", op.input("in", flow, TestingSource(items(), 1)))
    workers = Workers(1)
    index = ordered(
        "index",
        stamped,
        logic=partial(IndexLogic, pipeline, None, expiry=expiry),
        workers=workers,
        key=txn_key(SHARDS),
    )
    needs_chain, skips_chain = chain_filters(pipeline)
    rows = op.map(  # the entity chain, on fresh states
        "chain",
        op.filter("rows", index, needs_chain),
        lambda kv: (kv[0], chained(pipeline, kv[1].txn)[0]) if isinstance(kv[1], FeatureRow) else kv,
    )
    rest = op.filter("rest", index, skips_chain)
    pending = ordered(
        "pending",
        rows,
        rest,
        logic=partial(PendingLogic, pipeline, None),
        workers=workers,
        key=pending_key(SHARDS),
    )
    dead = op.filter_map("dead", index, dead_letter_of)
    op.output("out", op.merge("all", op.key_rm("unkey", pending), dead), TestingSink(out))
    held = PendingLogic.held
    run_main(flow)
    assert sorted(v.txn.txn_id for v in out if isinstance(v, FeatureVector)) == ["t1", "t2"]
    assert not [v for v in out if isinstance(v, LabelledVector)]  # t1's vector was gone when its label came
    dead = [(d.reason, d.txn_id) for d in out if isinstance(d, DeadLetter)]
    assert sorted(dead) == [("unknown_txn", "t1"), ("unknown_txn", "t2")]
    assert PendingLogic.held == held  # both vectors dropped from the gauge's count


def test_per_transaction_state_is_compact_and_invisible_to_the_garbage_collector(
    pipeline: FeaturePipeline,
) -> None:
    """The index and `pending` hold an entry per transaction for weeks, in a few shard keys: the
    entries live in compact tables (`features.table`: no Python object per entry), untracked by
    the GC (a full collection would walk millions of them, a pause of seconds), and no object per
    transaction has a dict."""
    stage = Stage("gc_test", partial(IndexLogic, pipeline, None), Workers(1), None)
    index = KeyedStep.build(stage, None)
    assert isinstance(index, StatefulBatchLogic)  # what Bytewax checks
    rows = index.on_batch([txn("t1", 1), txn("t2", 2), Label("t1", True, NOW_MS + 1, seq=3)])[0]
    assert index.logic is not None and not gc.is_tracked(index) and not hasattr(index, "__dict__")
    items = index.logic.items  # type: ignore[attr-defined]
    assert type(items) is Table and (COMPILED or isinstance(items, dict))
    assert items["t1"] == labelled(0)  # no expiry: every entry in bucket 0
    assert msgspec.msgpack.decode(items["t2"], type=TxnEntry) == pipeline.start(txn("t2", 2))[1]
    pending = PendingLogic(pipeline, None, None)
    pending.apply([r for r in rows if isinstance(r, FeatureRow) and r.txn.txn_id == "t2"])
    for d in (items, pending.items):
        gc.collect()
        assert not gc.is_tracked(d) and not any(map(gc.is_tracked, d.values())), d
    assert not hasattr(pending, "__dict__") and not hasattr(index.logic, "__dict__")


def test_a_run_moves_its_start_up_objects_out_of_the_collectors_reach() -> None:
    """Importing `flows.fraud` pauses the collector and freezes what its imports created (the
    modules' objects, walked again and again otherwise); `settle_heap` (called by `fraud run` and
    `flows.fraud:flow` once the flow is built) collects and freezes what building it created: a
    full collection then walks only what the run creates. A process whose collector is off keeps
    it off and nothing is frozen. In child processes: each changes its interpreter's collector."""
    code = (
        "import gc\n"
        "import flows.fraud, service.runtime as r\n"
        "after_import = (int(gc.isenabled()), gc.get_freeze_count(), len(gc.get_objects()))\n"
        "r.settle_heap()\n"
        "print(*after_import, gc.get_freeze_count(), len(gc.get_objects()), *gc.get_threshold())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    enabled, frozen, walked, frozen_run, walked_run, *threshold = map(int, out.stdout.split())
    assert enabled == 1 and frozen > 50_000 and walked < frozen / 10
    assert frozen_run >= frozen and walked_run < 1_000
    assert threshold == [YOUNG_COLLECTION_AT, 10, 10]  # batches do not set off collections
    code = "import gc\ngc.disable()\nimport flows.fraud\nprint(int(gc.isenabled()), gc.get_freeze_count())\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["0", "0"]


@pytest.mark.parametrize("table_kind", ["compiled", "dict"])
@pytest.mark.parametrize("with_files", [True, False])
def test_index_and_pending_resume_alike_on_either_table(
    pipeline: FeaturePipeline,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    table_kind: str,
    with_files: bool,
) -> None:
    """The index and `pending` keep their entries in `features.table.Table` (compiled) or, on an
    install without a C compiler, a dict: either way a snapshot (files or a pickled copy) resumes
    the same entries, a label joins its transaction once and brings back the scored values."""
    if table_kind == "dict":
        monkeypatch.setattr("features.table.Table", DictTable)
        monkeypatch.setattr("flows.shards.Table", DictTable)
    txns = [txn(f"t{i}", i, card=f"c{i % 2}", amount=1.5 + i) for i in range(1, 5)]

    def files(step: str) -> StateFiles | None:
        return StateFiles(tmp_path, step) if with_files else None

    index, pending = (
        IndexLogic(pipeline, files("index"), None),
        PendingLogic(pipeline, files("pending"), None),
    )
    rows = [r for r in index.apply(list(txns)) if isinstance(r, FeatureRow)]
    for r in rows:
        for plan in pipeline.plans:
            pipeline.observe(plan, plan.new_state(), r)
    scored = [v for v in pending.apply(rows) if isinstance(v, FeatureVector)]
    assert type(index.items) is (DictTable if table_kind == "dict" else Table) and len(index.items) == len(
        txns
    )
    snaps = [pickle.loads(pickle.dumps(logic.snapshot())) for logic in (index, pending)]
    for step in ("index", "pending"):  # with files, each step wrote its shard to its own
        assert with_files == any(p.is_file() for p in tmp_path.rglob(f"*{step}*/**/*")), step
    index, pending = (
        IndexLogic(pipeline, files("index"), snaps[0]),
        PendingLogic(pipeline, files("pending"), snaps[1]),
    )
    assert sorted(index.items.keys()) == sorted(pending.items.keys()) == sorted(t.txn_id for t in txns)
    t0 = txns[0].txn_id
    joined = index.apply(
        [Label(t0, True, NOW_MS + 9, seq=20), Label(t0, False, NOW_MS + 10, seq=21), txns[0]]
    )
    assert [type(j).__name__ for j in joined] == ["LabelEvent", "DeadLetter", "DeadLetter"]
    assert [d.reason for d in joined[1:]] == ["duplicate_label", "duplicate_txn"]  # type: ignore[union-attr]
    (learned,) = pending.apply([joined[0]])
    assert isinstance(learned, LabelledVector) and learned.is_fraud and learned.seq == 20
    assert np.array_equal(learned.values, np.asarray(scored[0].values, dtype=np.float32), equal_nan=True)
    assert t0 not in pending.items and len(pending.items) == len(txns) - 1


def test_batch_replays_join_labels_to_held_vectors_within_the_ttl(pipeline: FeaturePipeline) -> None:
    """`PendingVectors` (what `fraud evaluate` keeps instead of the `pending` step): a label gets
    its transaction's scored values with its own identity, order and time; a vector older than
    the TTL behind the newest event is forgotten (one exactly at the TTL is kept); a label for a
    transaction never held, forgotten or already joined gets None."""
    held = PendingVectors(ttl_ms=60_000)
    rows = chained(pipeline, txn("t1", 1), txn("t2", 2, minutes=1), txn("t3", 3, minutes=2))
    vectors = [FeatureVector(r.txn, pipeline.assemble(r), False) for r in rows]
    for v in vectors[:2]:
        held.hold(v)  # t2 is the TTL after t1: t1 is kept
    assert list(held.vectors) == ["t1", "t2"]
    _, entry = pipeline.start(rows[1].txn)
    label = join_label("t2", entry, Label("t2", True, NOW_MS + 5 * 60_000, seq=9))
    assert isinstance(label, LabelEvent)
    joined = held.join(label)
    assert joined == LabelledVector("t2", True, joined.values if joined else [], 9, NOW_MS + 5 * 60_000)
    assert joined is not None and bytes(joined.values) == bytes(array("f", vectors[1].values))
    assert held.join(label) is None  # joined once
    held.hold(vectors[2])  # t3 is two TTLs after t1: t1 is forgotten
    assert list(held.vectors) == ["t3"]
    assert held.join(msgspec.structs.replace(label, txn_id="t1")) is None
    assert held.join(msgspec.structs.replace(label, txn_id="never")) is None


def test_pending_keeps_its_shard_in_the_state_files_it_is_given(
    pipeline: FeaturePipeline, tmp_path: Path
) -> None:
    """With a recovery store, `pending` writes its shard to the step's files (a snapshot names them
    instead of copying the entries) and resumes from them."""
    from flows.shards import state_files

    logic = PendingLogic(pipeline, state_files(tmp_path, "pending"), None)
    (row,) = chained(pipeline, txn("t1", 1, amount=3.0))
    logic.apply([row])
    snap = logic.snapshot()
    assert [p for p in (tmp_path / "pending").rglob("*") if p.is_file()]  # the shard's own files
    resumed = PendingLogic(pipeline, state_files(tmp_path, "pending"), pickle.loads(pickle.dumps(snap)))
    assert list(resumed.items) == ["t1"]


def test_the_index_waits_for_a_watermark_from_each_partition_its_source_reads() -> None:
    """`partitions` is how many watermark senders the ordering waits for: every shard of a Redis
    source, each partition a source lists, 1 for a source that cannot say."""
    from flows.redis_source import RedisShardSource

    assert partitions(RedisShardSource("redis://localhost:1", "p", 3)) == 3
    assert partitions(TestingSource([1, 2])) == 1
    assert partitions(object()) == 1
