"""The stateful steps of `flows.steps`, each run on a tiny dataflow of its own (`op.stateful_batch`
over a `TestingSource` of a few items, `run_main`), the way Bytewax tests its operators; and the
logic classes called directly where a test needs to reach into a key (retention, snapshots).

How the steps are wired together is `flows.fraud.build`; the whole flow is tests/test_flow.py.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import bytewax.operators as op
import numpy as np
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from features.engine import FeaturePipeline, FeatureRow, FeatureVector, LabelEvent, join_label
from features.events import DeadLetter, Label, Transaction, encode
from features.privacy import card_token
from flows.ordering import INF, Watermark
from flows.routing import set_workers
from flows.steps import (
    EntityLogic,
    IndexConfig,
    IndexLogic,
    PendingLogic,
    Quarantined,
    ScoringLogic,
    decoder,
    entity_key,
    pending_key,
    txn_key,
)
from models.serving import Decision, LabelledVector
from service.runtime import Runtime, load_runtime, new_pipeline
from service.settings import Settings

NOW_MS = int(datetime.now(UTC).timestamp() * 1000)
TTL = timedelta(days=60)


@pytest.fixture(scope="module")
def pipeline() -> FeaturePipeline:
    return new_pipeline(Settings())


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return load_runtime(Settings(), need_redis=False)


def txn(txn_id: str, seq: int, card: str = "c1", minutes: int = 0, amount: float = 5.0) -> Transaction:
    return Transaction(txn_id, NOW_MS + minutes * 60_000, card, "m1", amount, seq=seq)


def run_step(
    items: list[Any], key: Callable[[Any], str], logic: Callable[[Any], Any], batch_size: int = 1
) -> list[Any]:
    """What one stateful step emits for `items`, keyed by `key`, in one worker."""
    out: list[Any] = []
    flow = Dataflow("step")
    keyed = op.key_on("key", op.input("in", flow, TestingSource(items, batch_size)), key)
    op.output("out", op.key_rm("unkey", op.stateful_batch("step", keyed, logic)), TestingSink(out))
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
    out = run_step(items, txn_key, partial(IndexLogic, IndexConfig(pipeline, TTL, 1)))
    row, dup, joined, *dead = out
    assert isinstance(row, FeatureRow) and row.txn.amount == 5.0
    assert row.keys == tuple(p.key_of(items[0]) for p in pipeline.plans)  # type: ignore[arg-type]
    assert isinstance(dup, DeadLetter) and (dup.reason, dup.txn_id) == ("duplicate_txn", "t1")
    assert json.loads(dup.raw)["amount"] == 9.0  # the copy, as received
    assert isinstance(joined, LabelEvent) and joined.is_fraud and joined.txn_ts_ms == NOW_MS
    assert joined.keys == row.keys
    assert [(d.reason, d.txn_id) for d in dead] == [("duplicate_label", "t1"), ("unknown_txn", "t9")]


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
    first, second, bad = run_step(rows, entity_key(card), partial(EntityLogic, pipeline, card))
    count_1h = card.names.index("count_by_card_1h")
    assert [len(r.parts) for r in (first, second)] == [1, 1]
    assert (first.parts[0][count_1h], second.parts[0][count_1h]) == (1.0, 2.0)  # one key's history
    assert isinstance(bad, Quarantined) and (bad.txn_id, bad.seq) == ("bad", 3)
    assert bad.dead.reason == "internal_error" and "card_features" in bad.dead.detail
    assert bad.keys == (None,) * len(pipeline.plans)  # passes the rest of the chain untouched


def test_flow_entity_keys_are_dropped_after_their_retention(pipeline: FeaturePipeline) -> None:
    """EntityLogic schedules a wall-clock notification one retention after its last event."""
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    row, _ = pipeline.start(Transaction("t1", now_ms, "c1", "m1", 5.0))
    logic = EntityLogic(pipeline, pipeline.plans[0], None)
    _, discard = logic.on_batch([row])
    assert not discard and logic.state is not None
    wake = logic.notify_at()
    assert wake is not None and (wake - datetime.now(UTC)).total_seconds() > 29 * 86_400
    assert logic.on_notify() == ([], False)  # fired early (e.g. after a restart): still fresh, kept
    days = pipeline.plans[0].retention_ms // 86_400_000 + 1  # the card's longest look-back, and a day
    logic.state[0] -= days * 1440  # the key's time origin (minutes): as if its only event were that old
    assert logic.on_notify() == ([], True)


# --- pending --------------------------------------------------------------------------------------


def test_pending_holds_the_vector_and_sends_it_with_the_label(pipeline: FeaturePipeline) -> None:
    (row,) = chained(pipeline, txn("t1", 1))
    _, entry = pipeline.start(row.txn)
    label = join_label("t1", entry, Label("t1", True, NOW_MS + 1, seq=2))
    assert isinstance(label, LabelEvent)
    vector, learned = run_step([row, label], pending_key, partial(PendingLogic, pipeline, TTL))
    assert isinstance(vector, FeatureVector) and vector.values == pipeline.assemble(row)
    assert isinstance(learned, LabelledVector) and (learned.txn_id, learned.is_fraud) == ("t1", True)
    assert np.array_equal(learned.values, vector.values, equal_nan=True)


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
    logic = PendingLogic(pipeline, TTL, None)
    (vector,), discard = logic.on_batch([row])
    assert isinstance(vector, FeatureVector) and not discard
    assert vector.values == pipeline.assemble(row)
    resumed = PendingLogic(pipeline, TTL, logic.snapshot())
    label = join_label("t1", entry, Label("t1", True, now_ms + 1, seq=2))
    assert isinstance(label, LabelEvent)
    (learned,), discard = resumed.on_batch([label])
    assert isinstance(learned, LabelledVector) and discard
    assert learned.is_fraud and np.array_equal(learned.values, vector.values, equal_nan=True)
    assert resumed.on_batch([label]) == ([], True)  # nothing held any more: nothing to learn

    set_workers(1)
    scoring = ScoringLogic(rt.new_scorer, None)
    assert scoring.on_batch([vector, learned]) == ([], False)  # held until the watermark passes
    decisions, _ = scoring.on_batch([Watermark(0, INF, 0)])
    assert [d.txn.txn_id for d in decisions] == ["t1"]  # type: ignore[union-attr]
    assert scoring.scorer.online.n_learned == 1
    # The model, and nothing held: nothing per transaction in the scorer's one key.
    model, held, relay = scoring.snapshot()
    assert model == (pickle.dumps(scoring.scorer.online),) and held == [] and relay.out == INF
    assert ScoringLogic(rt.new_scorer, scoring.snapshot()).scorer.online.n_learned == 1
    # A snapshot from before the canonical order (the models alone) still resumes.
    assert ScoringLogic(rt.new_scorer, model).scorer.online.n_learned == 1


# --- scoring --------------------------------------------------------------------------------------


def test_scoring_decides_in_canonical_order(runtime: Runtime) -> None:
    """Vectors arriving out of order in one batch are decided in `seq` order, once the watermark
    has passed them (the online model's state depends on that order)."""
    set_workers(1)
    txns = [txn(f"t{s}", s, card=f"c{s % 3}", minutes=s) for s in (4, 1, 3, 2, 5)]
    vectors: list[Any] = [
        FeatureVector(r.txn, runtime.pipeline.assemble(r), False) for r in chained(runtime.pipeline, *txns)
    ]
    out = run_step(
        [*vectors, Watermark(0, INF, 0)],
        lambda _: "scorer",
        partial(ScoringLogic, runtime.new_scorer),
        batch_size=len(vectors) + 1,
    )
    assert all(isinstance(d, Decision) for d in out)
    assert [d.txn.txn_id for d in out] == ["t1", "t2", "t3", "t4", "t5"]


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
