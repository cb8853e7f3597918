"""The fraud-scoring dataflow: `python -m bytewax.run flows.fraud`.

read -> decode -> stamp (each event's place in the canonical order, per partition) -> index
(transaction shards; with several partitions a label whose transaction is not there yet waits
for the watermark: it may come from another partition) -> card -> merchant -> device features (entity shards; rows, and
the labels an entity counts) ->
pending (transaction shards: the vector waits for its label; other labels come straight from the index) ->
score (one replica per worker) -> alerts, late side output, drift events, decision log; bad records -> dead
letters, and so does a record any step raised on (`flows.steps.quarantine`). Each step is one
`flows.ordering.ordered` operator, so any number of processes computes what one does. This
module only wires steps: the logic lives in `features`, `models`, `flows.steps`,
`flows.ordering`, `flows.outputs` and `flows.connectors`.
"""

from __future__ import annotations

import gc

# Start-up creates some 120k objects that live as long as the process (the modules' functions,
# types and constants), and the collector would walk them again and again while they are being
# created. So collection pauses during these imports, and after them what they created is frozen
# (`gc.freeze`: never walked again; about a thousand of them are garbage, kept) before it resumes;
# `settle_heap` later collects and freezes what building the flow created.
# `python -m benchmarks.gc_pauses --startup 5` prints what this saves at each start.
_collecting = gc.isenabled()
gc.disable()
try:
    from datetime import timedelta
    from functools import partial
    from pathlib import Path
    from typing import Any

    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.inputs import Source
    from bytewax.outputs import Sink

    from flows import batch, connectors
    from flows.expiry import Expiry
    from flows.ordering import ordered
    from flows.outputs import (
        ProgressSink,
        alert_entry,
        count_dead_letter,
        decision_entry,
        dlq_entry,
        drift_entry,
        late_entry,
    )
    from flows.routing import Shards, WorkerCount, Workers
    from flows.shards import state_files
    from flows.stamping import stamp
    from flows.steps import (
        EntityLogic,
        IndexLogic,
        PendingLogic,
        ScoringLogic,
        chain_filters,
        dead_letter_of,
        decision_of,
        decoder,
        drift_of,
        entity_key,
        is_dead_letter,
        is_valid,
        partitions,
        pending_key,
        scorer_key,
        to_every_replica,
        txn_key,
    )
    from service import telemetry
    from service.runtime import load_runtime, settle_heap
    from service.settings import Settings, get_settings
finally:
    if _collecting:
        gc.freeze()
        gc.enable()


def build(
    settings: Settings | None = None,
    *,
    source: Source[Any] | None = None,
    alerts: Sink[Any] | None = None,
    dead_letters: Sink[Any] | None = None,
    decisions: Sink[Any] | None = None,
    late: Sink[Any] | None = None,
    drift: Sink[Any] | None = None,
    state_dir: Path | None = None,
) -> Dataflow:
    """The dataflow for `settings`; tests swap the source and sinks for in-memory ones.

    `state_dir`: where the shards of the index, the entity steps and `pending` append their deltas
    (`flows.shards`);
    `fraud run` passes `<FRAUD_RECOVERY_DIR>/state` when it runs with recovery. Without it their
    snapshots are their whole tables, lent copy-on-write (copied only while Bytewax still holds
    one): right for any runner, with or without recovery, and nothing is written (a flow that runs
    without recovery must not touch a recovery store's files)."""
    given = settings or get_settings()
    needs_redis = (
        (source is None and given.source == "redis")
        or None in (alerts, dead_letters, late, drift)
        or (decisions is None and given.decision_log)
    )
    rt = load_runtime(given, need_redis=needs_redis)
    s, pipeline = rt.settings, rt.pipeline
    flow = Dataflow("fraud")

    src = source or connectors.source(rt)
    workers = Workers()
    step = partial(ordered, workers=workers)  # every stateful step: in the canonical order
    ttl = timedelta(days=s.label_ttl_days)
    ahead = s.snapshot_interval_s if s.snapshot_ahead else None  # shards write ahead of each close
    shards = Shards(s.state_shards)
    needs_chain, skips_chain = chain_filters(pipeline)

    read = op.merge("records", op.input("read", flow, src), op.input("workers", flow, WorkerCount(workers)))
    decoded = batch.each("decode", read, decoder(rt.card_ref, rt.command_key))
    stamped = stamp("stamp", batch.keep("valid", decoded, is_valid))
    parts = partitions(src)
    index = step(
        "index",
        stamped,
        # a label may come from another partition than its transaction: parked until it is due
        logic=partial(
            IndexLogic,
            pipeline,
            state_files(state_dir, "index", ahead),
            expiry=Expiry(ttl),
            parks=parts > 1,
            shards=shards,
        ),
        key=txn_key(shards),
        sources=parts,
    )
    rows = batch.keep("to_chain", index, needs_chain)
    for plan in pipeline.plans:
        rows = step(
            plan.entity.name,
            rows,
            logic=partial(
                EntityLogic, pipeline, plan, state_files(state_dir, plan.entity.name, ahead), shards=shards
            ),
            key=entity_key(plan, shards),
            sequence=True,
        )
    labels = batch.keep("skip_chain", index, skips_chain)
    pending = partial(PendingLogic, pipeline, state_files(state_dir, "pending", ahead), shards=shards)
    vectors = step("pending", rows, labels, logic=pending, key=pending_key(shards))
    scores = step(
        "score",
        vectors,
        logic=partial(ScoringLogic, rt.new_scorer),
        key=scorer_key(shards),
        per_worker=True,
        everywhere=to_every_replica,
        last=True,
    )
    scored = batch.keep_map("scored_ok", scores, decision_of)

    op.output(
        "alerts_out",
        batch.keep_map("alert", scored, alert_entry),
        alerts or connectors.stream(rt, s.alerts_stream, "txn_id"),
    )
    late_out = batch.keep_map("late", scored, late_entry)
    op.output("late_out", late_out, late or connectors.stream(rt, s.late_stream, "txn_id"))

    drift_out = batch.keep_map("drift", scores, drift_of)
    op.output(
        "drift_out",
        op.map("drift_entry", drift_out, drift_entry),
        drift or connectors.stream(rt, s.drift_stream, "id"),
    )

    bad = batch.keep("invalid", decoded, is_dead_letter)
    unknown = batch.keep_map("unjoined", index, dead_letter_of)
    failed = batch.keep_map("failed", scores, dead_letter_of)
    dead = op.map("count_dead", op.merge("dead", bad, unknown, failed), count_dead_letter)
    dlq = op.map("dlq_entry", dead, dlq_entry)
    op.output("dlq_out", dlq, dead_letters or connectors.stream(rt, s.dlq_stream, "id"))

    if decisions is not None:
        op.output("decisions_out", scored, decisions)
    elif s.decision_log:
        log = partial(decision_entry, names=pipeline.names)
        op.output(
            "decision_log",
            op.map("decision", scored, log),
            connectors.decision_log(rt),
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
        settle_heap()
        return flow
    raise AttributeError(name)
