"""The logic of each stateful flow step: thin adapters from Bytewax to `features` and `models`.

Each class holds compact, plain state and returns a cheap, immutable snapshot: Bytewax calls
`snapshot()` for every touched key at every epoch close, with or without recovery.
"""

from __future__ import annotations

import operator
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

from bytewax.operators import StatefulBatchLogic

from features.engine import (
    FeatureRow,
    FeatureVector,
    LabelEvent,
    Pipeline,
    TxnEntry,
    duplicate_txn,
    join_label,
)
from features.events import DeadLetter, Decoded, Label, Record, Transaction, decode
from features.state import EntityState
from flows.ordering import TICK, OrderedBatch, Relay, RelayState, Tick, Watermark, partition_of, relay_batch
from flows.outputs import count_decisions
from fraud import metrics
from models.serving import Decision, LabelledVector, Scorer

Chained = FeatureRow | LabelEvent


def decode_record(record: Record) -> Decoded | Tick:
    """Decode at the edge, stamping arrival time (latency); `flows.ordering.StampLogic` then
    gives each event its place in the canonical order (`seq`)."""
    kind, raw, origin = record
    if kind == TICK:
        return Tick(partition_of(origin))
    return decode(kind, raw, time.time_ns(), 0, origin)


def in_order(items: list[Any]) -> list[Any]:
    """Bytewax hands a keyed step its batch grouped by key; apply it in canonical order."""
    items.sort(key=_seq)
    return items


_seq = operator.attrgetter("seq")


def is_valid(event: Decoded | Tick) -> TypeGuard[Transaction | Label | Tick]:
    return not isinstance(event, DeadLetter)


def txn_key(event: Transaction | Label) -> str:
    return event.txn_id


def pending_key(item: Chained) -> str:
    """A row or label leaving the entity chain is keyed by its transaction for `pending`."""
    return item.txn.txn_id if isinstance(item, FeatureRow) else item.txn_id


Scored = FeatureVector | LabelledVector


def to_scorer(kv: tuple[str, Scored | Watermark]) -> tuple[str, Scored | Watermark]:
    """Every vector, labelled vector and watermark goes to the one scorer key (one River model
    learns all)."""
    return "scorer", kv[1]


def partitions(source: Any) -> int:
    """How many partitions `source` reads (each sends its own watermarks); 1 if it cannot say."""
    list_parts = getattr(source, "list_parts", None)
    return len(list_parts()) if list_parts is not None else 1


def joined_value(kv: tuple[str, Chained | DeadLetter]) -> bool:
    return not isinstance(kv[1], DeadLetter)


def entity_key(i: int) -> Callable[[Chained], str]:
    """Key of chain step `i`; an item whose entity is absent gets a private pass-through key."""

    def key(item: Chained) -> str:
        k = item.keys[i]
        if k is not None:
            return k
        return f"~{item.txn.txn_id}" if isinstance(item, FeatureRow) else f"~{item.txn_id}"

    return key


class Relaying:
    """A keyed step's watermark keys (`flows.routing.worker_keys`) share its logic class: a key
    whose first item is a `Watermark` becomes a relay, forwarding the step's watermark after the
    events it covers (see `flows.ordering`)."""

    relay: Relay | None = None

    def _relay_batch(self, items: list[Any], expected: int | None = None) -> tuple[list[Any], bool]:
        if self.relay is None:
            self.relay = Relay(expected)
        return relay_batch(self.relay, items), StatefulBatchLogic.RETAIN


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """What every key of the index shares, in one object: the index holds a key per transaction
    for weeks, and each attribute of its own would cost every one of them a dict entry."""

    pipeline: Pipeline
    ttl: timedelta
    partitions: int  # of the source: the origins whose watermarks the index's relay keys combine


class IndexLogic(
    Relaying, StatefulBatchLogic[Transaction | Label, Chained | DeadLetter, tuple[Any, ...] | RelayState]
):
    """Keyed by txn_id: rejects duplicate transactions and joins labels to their transaction.

    An entry lives `ttl` of wall-clock time (labels arrive days later); a label for a transaction
    never seen, or already labelled, becomes a dead letter.
    """

    def __init__(self, config: IndexConfig, resume: tuple[Any, ...] | RelayState | None) -> None:
        self.config = config
        if isinstance(resume, RelayState):
            self.relay, resume = Relay(config.partitions, resume), None
        self.entry = TxnEntry(*resume) if resume else None
        self.expires = datetime.now(UTC) + config.ttl

    def on_batch(self, items: list[Any]) -> tuple[list[Any], bool]:
        if self.relay is not None or type(items[0]) is Watermark:
            return self._relay_batch(items, self.config.partitions)  # origins: the source partitions
        out: list[Chained | DeadLetter] = []
        for item in in_order(items):
            if isinstance(item, Label):
                out.append(join_label(item.txn_id, self.entry, item))
            elif self.entry is not None:
                out.append(duplicate_txn(item))
            else:
                row, self.entry = self.config.pipeline.start(item)
                out.append(row)
        return out, self.entry is None

    def notify_at(self) -> datetime | None:
        return self.expires if self.entry is not None else None

    def on_notify(self) -> tuple[list[Chained | DeadLetter], bool]:
        return [], StatefulBatchLogic.DISCARD

    def snapshot(self) -> tuple[Any, ...] | RelayState:
        if self.relay is not None:
            return self.relay.state()
        e = self.entry
        assert e is not None, "a key without an entry is discarded, never snapshotted"
        return (e.ts_ms, e.keys, e.labelled)


class EntityLogic(Relaying, StatefulBatchLogic[Chained, Chained, tuple[Any, ...] | RelayState]):
    """Keyed by one entity (card, merchant, device...): adds its window features to each row.

    Idle keys are dropped: `notify_at` fires once the key's retention has passed in wall-clock
    time since its last event (event time runs at wall-clock speed in production; a fast replay
    keeps every key until it ends), and `on_notify` discards the key if it has expired.
    """

    def __init__(self, pipeline: Pipeline, i: int, resume: tuple[Any, ...] | RelayState | None) -> None:
        self.pipeline, self.i = pipeline, i
        self.plan = pipeline.plans[i]
        if isinstance(resume, RelayState):
            self.relay, resume = Relay(None, resume), None
        self.state: EntityState | None = None if resume is None else self.plan.restore(resume)
        self.idle_until = datetime.now(UTC) + timedelta(milliseconds=self.plan.retention_ms)

    def on_batch(self, items: list[Any]) -> tuple[list[Any], bool]:
        if self.relay is not None or type(items[0]) is Watermark:
            return self._relay_batch(items)
        p, i = self.pipeline, self.i
        for item in in_order(items):
            if self.state is None and item.keys[i] is not None:
                self.state = self.plan.new_state()
            if isinstance(item, FeatureRow):
                p.observe(i, self.state, item)
            elif self.state is not None:
                p.observe_label(i, self.state, item)
        self.idle_until = datetime.now(UTC) + timedelta(milliseconds=self.plan.retention_ms)
        return items, self.state is None

    def notify_at(self) -> datetime | None:
        return self.idle_until if self.state is not None else None

    def on_notify(self) -> tuple[list[Chained], bool]:
        assert self.state is not None
        return [], self.plan.expired(self.state, int(datetime.now(UTC).timestamp() * 1000))

    def snapshot(self) -> tuple[Any, ...] | RelayState:
        if self.relay is not None:
            return self.relay.state()
        s = self.state
        assert s is not None, "a pass-through key is discarded, never snapshotted"
        return s.snapshot()


class PendingLogic(Relaying, StatefulBatchLogic[Chained, Scored, bytes | RelayState]):
    """Keyed by txn_id, after the entity chain: assembles the transaction's feature vector, passes
    it on to be scored and keeps a copy until its label arrives (or `ttl` of wall-clock time
    passes, as in the index), then sends the label with that copy for the online model to learn.

    One small key per transaction instead of a dict inside the scorer: Bytewax snapshots only the
    keys an epoch touched, while the scorer's single key is snapshotted whole at every epoch.
    """

    held = 0  # vectors held by this process's keys (the `fraud_pending_transactions` gauge)

    def __init__(self, pipeline: Pipeline, ttl: timedelta, resume: bytes | RelayState | None) -> None:
        self.pipeline = pipeline
        self.values: array[float] | None = None
        if isinstance(resume, RelayState):
            self.relay, resume = Relay(None, resume), None
        if resume is not None:
            self.values = array("d")
            self.values.frombytes(resume)
            PendingLogic.held += 1
        self.expires = datetime.now(UTC) + ttl

    def on_batch(self, items: list[Any]) -> tuple[list[Any], bool]:
        if self.relay is not None or type(items[0]) is Watermark:
            return self._relay_batch(items)
        out: list[Scored] = []
        for it in in_order(items):
            if isinstance(it, FeatureRow):
                values = self.pipeline.assemble(it)
                out.append(FeatureVector(it.txn, values, it.late))
                if self.values is None:
                    PendingLogic.held += 1
                self.values = array("d", values)
                continue
            metrics.LABELS.labels(is_fraud="true" if it.is_fraud else "false").inc()
            if self.values is not None:  # None: the row expired, or never came (dead-lettered)
                out.append(LabelledVector(it.txn_id, it.is_fraud, self.values, it.seq))
                self.values = None
                PendingLogic.held -= 1
        metrics.PENDING.set(PendingLogic.held)
        return out, self.values is None

    def notify_at(self) -> datetime | None:
        return self.expires if self.values is not None else None

    def on_notify(self) -> tuple[list[Scored], bool]:
        if self.values is not None:
            PendingLogic.held -= 1
            self.values = None
        return [], StatefulBatchLogic.DISCARD

    def snapshot(self) -> bytes | RelayState:
        if self.relay is not None:
            return self.relay.state()
        assert self.values is not None, "a key without a vector is discarded, never snapshotted"
        return self.values.tobytes()


ScorerState = tuple[tuple[Any, ...], list[Scored], RelayState]


class ScoringLogic(StatefulBatchLogic[Scored | Watermark, Decision, ScorerState]):
    """Scores feature vectors in vectorised batches and feeds labelled vectors to River, in
    canonical order: it holds what arrives until the watermark from every `pending` worker has
    passed it (the River model's state depends on the order it learns and predicts in)."""

    def __init__(
        self, new_scorer: Callable[[], Scorer], resume: ScorerState | tuple[Any, ...] | None
    ) -> None:
        self.scorer = new_scorer()
        held: tuple[list[Scored], RelayState] | None = None
        if resume is not None and len(resume) == 3 and isinstance(resume[2], RelayState):
            held = (resume[1], resume[2])
            resume = resume[0]
        if resume is not None:  # or a snapshot from before the canonical order: the models alone
            self.scorer.restore(resume)
        self.batch = OrderedBatch("score", None, held)

    def on_batch(self, items: list[Scored | Watermark]) -> tuple[list[Decision], bool]:
        return self._score(self.batch.take(items)[0])

    def notify_at(self) -> datetime | None:
        return self.batch.notify_at()

    def on_notify(self) -> tuple[list[Decision], bool]:
        return self._score(self.batch.overdue())

    def on_eof(self) -> tuple[list[Decision], bool]:
        return self._score(self.batch.drain())

    def _score(self, items: list[Scored]) -> tuple[list[Decision], bool]:
        if not items:
            return [], StatefulBatchLogic.RETAIN
        started = time.perf_counter()
        decisions = self.scorer.process(items)
        stats = self.scorer.last
        if stats.rows:
            metrics.SCORING_SECONDS.observe(time.perf_counter() - started)
            metrics.SCORING_BATCH.observe(stats.rows)
        metrics.ONLINE_LEARNED.inc(stats.labels_learned)
        count_decisions(decisions)
        return decisions, StatefulBatchLogic.RETAIN

    def snapshot(self) -> ScorerState:
        held, relay = self.batch.snapshot()
        return (self.scorer.snapshot(), held, relay)
