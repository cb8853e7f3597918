"""The fraud-scoring dataflow: `python -m bytewax.run flows.fraud`.

read -> decode -> index (txn_id) -> one feature step per entity -> score -> alerts / dead letters.
This module only wires steps; the logic lives in `features`, `models` and `flows.steps`.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from flows.file_source import FileReplaySource
from flows.outputs import ProgressSink, alert_entry, count_dead_letter, dlq_entry, late_entry
from flows.redis_sink import RedisStreamSink
from flows.steps import (
    EntityLogic,
    IndexLogic,
    ScoringLogic,
    decode_record,
    entity_key,
    is_joined,
    is_valid,
    txn_key,
)
from fraud import metrics
from fraud.runtime import Runtime, load_runtime
from fraud.settings import Settings, get_settings


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
    rt: Runtime = load_runtime(settings, need_redis=None in (alerts, dead_letters, late))
    s, pipeline = rt.settings, rt.pipeline
    flow = Dataflow("fraud")

    records = op.input(
        "read",
        flow,
        source or FileReplaySource(s.transactions_path, s.labels_path, s.source_batch_size),
    )
    decoded = op.branch(
        "validate",
        op.map("decode", records, decode_record),
        is_valid,
    )

    by_txn = op.key_on("key_txn", decoded.trues, txn_key)
    index = partial(IndexLogic, pipeline, timedelta(days=s.label_ttl_days))
    indexed = op.branch(
        "joined",
        op.key_rm("unkey_txn", op.stateful_batch("index", by_txn, index)),
        is_joined,
    )

    rows = indexed.trues
    for i, plan in enumerate(pipeline.plans):
        name = plan.entity.name
        keyed = op.key_on(f"key_{name}", rows, entity_key(i))
        rows = op.key_rm(
            f"unkey_{name}",
            op.stateful_batch(f"{name}_features", keyed, partial(EntityLogic, pipeline, i)),
        )

    to_scorer = op.key_on("key_scorer", rows, lambda _: "scorer")
    scored = op.key_rm(
        "unkey_scorer",
        op.stateful_batch("score", to_scorer, partial(ScoringLogic, pipeline, rt.new_scorer)),
    )

    alert_entries = op.filter_map(
        "alert", scored, partial(alert_entry, model_version=rt.version, threshold=rt.threshold)
    )
    op.output(
        "alerts_out",
        alert_entries,
        alerts or RedisStreamSink(rt.redis_url, s.alerts_stream, s.stream_maxlen),
    )

    dead = op.map("count_dead", op.merge("dead", decoded.falses, indexed.falses), count_dead_letter)
    op.output(
        "dlq_out",
        op.map("dlq_entry", dead, dlq_entry),
        dead_letters or RedisStreamSink(rt.redis_url, s.dlq_stream, s.stream_maxlen),
    )

    late_entries = op.filter_map("late", scored, late_entry)
    op.output("late_out", late_entries, late or RedisStreamSink(rt.redis_url, s.late_stream, s.stream_maxlen))

    op.output("progress", op.merge("activity", scored, dead), ProgressSink(s.progress_interval_s))
    if decisions is not None:
        op.output("decisions_out", scored, decisions)
    return flow


def __getattr__(name: str) -> Dataflow:
    """`flow` is built on first access, so importing this module has no side effects."""
    if name == "flow":
        flow = build()
        settings = get_settings()
        if settings.metrics_port:
            metrics.serve(settings.metrics_port)
        return flow
    raise AttributeError(name)
