"""The fraud-scoring dataflow: `python -m bytewax.run flows.fraud`.

read -> decode -> stamp (each event's place in the canonical order, per partition) -> index
(txn_id) -> for each entity: order (release in that order) -> features -> pending (txn_id: the
vector waits for its label) -> score -> alerts, late side output, decision log; bad records ->
dead letters, and so does a record any step raised on (`flows.steps.quarantine`). Watermarks travel with the events (`flows.ordering`), so any number of processes
computes what one does. This module only wires steps: the logic lives in `features`, `models`,
`flows.steps`, `flows.ordering`, `flows.outputs` and `flows.connectors`.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from flows import connectors
from flows.ordering import SequencerLogic, StampLogic, by_bucket, by_key, stamp_key
from flows.outputs import ProgressSink, alert_entry, count_dead_letter, decision_entry, dlq_entry, late_entry
from flows.routing import WorkerCount
from flows.steps import (
    EntityLogic,
    IndexConfig,
    IndexLogic,
    PendingLogic,
    ScoringLogic,
    decoder,
    entity_key,
    is_decision,
    is_valid,
    joined_value,
    partitions,
    pending_key,
    to_scorer,
    txn_key,
)
from service import telemetry
from service.runtime import load_runtime
from service.settings import Settings, get_settings


def build(
    settings: Settings | None = None,
    *,
    source: Source[Any] | None = None,
    alerts: Sink[Any] | None = None,
    dead_letters: Sink[Any] | None = None,
    decisions: Sink[Any] | None = None,
    late: Sink[Any] | None = None,
) -> Dataflow:
    """The dataflow for `settings`; tests swap the source and sinks for in-memory ones."""
    rt = load_runtime(settings, need_redis=source is None or None in (alerts, dead_letters, late))
    s, pipeline = rt.settings, rt.pipeline
    flow = Dataflow("fraud")

    src = source or connectors.source(rt)
    records = op.merge("records", op.input("read", flow, src), op.input("workers", flow, WorkerCount()))
    decoded = op.branch("validate", op.map("decode", records, decoder(rt.card_ref)), is_valid)
    stamped = op.stateful_batch("stamp", op.map("key_partition", decoded.trues, stamp_key), StampLogic)

    index = partial(IndexLogic, IndexConfig(pipeline, timedelta(days=s.label_ttl_days), partitions(src)))
    indexed = op.stateful_batch("index", op.flat_map_batch("key_txn", stamped, by_key(txn_key)), index)
    joined = op.branch("joined", indexed, joined_value)

    rows: Any = joined.trues
    for plan in pipeline.plans:
        name, key = plan.entity.name, entity_key(plan)
        ordered = op.stateful_batch(
            f"{name}_order",
            op.flat_map_batch(f"bucket_{name}", rows, by_bucket(key)),
            partial(SequencerLogic, f"{name}_order"),
        )
        rows = op.stateful_batch(
            f"{name}_features",
            op.flat_map_batch(f"key_{name}", ordered, by_key(key)),
            partial(EntityLogic, pipeline, plan),
        )

    pending = partial(PendingLogic, pipeline, timedelta(days=s.label_ttl_days))
    vectors = op.stateful_batch(
        "pending", op.flat_map_batch("key_pending", rows, by_key(pending_key)), pending
    )

    scoring = partial(ScoringLogic, rt.new_scorer)
    outcome = op.branch(
        "scored_ok",
        op.key_rm(
            "unkey_scorer", op.stateful_batch("score", op.map("key_scorer", vectors, to_scorer), scoring)
        ),
        is_decision,
    )
    scored = outcome.trues

    alert = partial(alert_entry, model_version=rt.version, threshold=rt.threshold)
    op.output(
        "alerts_out",
        op.filter_map("alert", scored, alert),
        alerts or connectors.stream(rt, s.alerts_stream, "txn_id"),
    )
    late_out = op.filter_map("late", scored, late_entry)
    op.output("late_out", late_out, late or connectors.stream(rt, s.late_stream, "txn_id"))

    dead = op.map(
        "count_dead",
        op.merge("dead", decoded.falses, op.key_rm("unkey_dead", joined.falses), outcome.falses),
        count_dead_letter,
    )
    dlq = op.map("dlq_entry", dead, dlq_entry)
    op.output("dlq_out", dlq, dead_letters or connectors.stream(rt, s.dlq_stream, "id"))

    if decisions is not None:
        op.output("decisions_out", scored, decisions)
    elif s.decision_log:
        log = partial(
            decision_entry,
            model_version=rt.version,
            threshold=rt.threshold,
            names=pipeline.names,
        )
        op.output(
            "decision_log",
            op.map("decision", scored, log),
            connectors.stream(rt, s.decision_stream, "txn_id", s.decision_dedupe_ttl_s),
        )

    op.output("progress", op.merge("activity", scored, dead), ProgressSink(s.progress_interval_s))
    return flow


def __getattr__(name: str) -> Dataflow:
    """`flow` is built on first access, so importing this module has no side effects."""
    if name == "flow":
        flow = build()
        settings = get_settings()
        if settings.metrics_port:
            telemetry.serve(settings.metrics_port)
        return flow
    raise AttributeError(name)
