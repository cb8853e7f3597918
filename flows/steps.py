"""The logic of each stateful flow step: thin adapters from Bytewax to `features` and `models`.

Each class holds compact, plain state and returns a cheap, immutable snapshot: Bytewax calls
`snapshot()` for every touched key at every epoch close, with or without recovery.
"""

from __future__ import annotations

import logging
import operator
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

import msgspec
from bytewax.operators import StatefulBatchLogic

from features.buffer import EntityState
from features.engine import (
    FeaturePipeline,
    FeatureRow,
    FeatureVector,
    LabelEvent,
    TxnEntry,
    duplicate_txn,
    join_label,
)
from features.events import DeadLetter, Decoded, Label, Record, Transaction, decode, encode
from features.plan import EntityPlan
from features.privacy import identity, tokenize_raw
from flows.ordering import TICK, OrderedBatch, Relay, RelayState, Tick, Watermark, partition_of, relay_batch
from flows.outputs import count_decisions
from models.serving import Decision, LabelledVector, Scorer
from service import telemetry

logger = logging.getLogger(__name__)

Chained = FeatureRow | LabelEvent


# --- quarantine ---------------------------------------------------------------------------------


class Quarantined(msgspec.Struct, frozen=True, gc=False):
    """A record a step failed on, on its way to the dead letters: the steps after it pass it on
    untouched (with no entity keys, it takes the chain's pass-through keys) until the index or the
    scorer hands its `dead` letter to the dead-letter stream. It keeps `seq`, so the steps that
    apply their batches in canonical order still can."""

    txn_id: str
    seq: int
    dead: DeadLetter
    keys: tuple[None, ...]


MAX_DETAIL_CHARS = 500
_logged: dict[tuple[str, str], int] = {}


def _dead_letter(item: Any, detail: str) -> DeadLetter:
    """The dead letter of any record a step may hold, as close to what was received as it can."""
    if isinstance(item, FeatureRow | FeatureVector):
        item = item.txn
    if isinstance(item, Transaction | Label):
        raw = item.raw or encode(item).decode()
        kind = "txn" if isinstance(item, Transaction) else "label"
        return DeadLetter(kind, "internal_error", detail, raw, item.txn_id, item.origin)
    if isinstance(item, LabelEvent):
        raw = encode(Label(item.txn_id, item.is_fraud, item.ts_ms)).decode()
        return DeadLetter("label", "internal_error", detail, raw, item.txn_id, item.origin)
    if isinstance(item, LabelledVector):
        raw = msgspec.json.encode({"txn_id": item.txn_id, "is_fraud": item.is_fraud}).decode()
        return DeadLetter("label", "internal_error", detail, raw, item.txn_id, "")
    return DeadLetter("unknown", "internal_error", detail, repr(item)[:MAX_DETAIL_CHARS], None, "")


def quarantine(item: Any, step: str, exc: Exception, n_keys: int = 0) -> Quarantined:
    """What a step sends on instead of `item` when handling it raised `exc`.

    The detail names the step and the exception (type and message, capped); the log gets one line
    for the first failure of each (step, exception type), then one every 1,000, so a flood of
    poison records cannot flood the log. Card ids never reach the log: it names the transaction.
    """
    detail = f"step {step!r} raised {type(exc).__name__}: {exc}"[:MAX_DETAIL_CHARS]
    dead = _dead_letter(item, detail)
    seen = _logged[step, type(exc).__name__] = _logged.get((step, type(exc).__name__), 0) + 1
    if seen == 1 or seen % 1000 == 0:
        logger.error(
            "step %r raised %s on transaction %r (%d so far): the record goes to the dead letters "
            "(internal_error) and the flow goes on",
            step,
            type(exc).__name__,
            (dead.txn_id or "?")[:64],
            seen,
        )
    return Quarantined(dead.txn_id or "", getattr(item, "seq", 0), dead, (None,) * n_keys)


def decode_record(record: Record) -> Decoded | Tick:
    """Decode at the edge, stamping arrival time (latency); `flows.ordering.StampLogic` then
    gives each event its place in the canonical order (`seq`)."""
    kind, raw, origin = record
    if kind == TICK:
        return Tick(partition_of(origin))
    return decode(kind, raw, time.time_ns(), 0, origin)


def decoder(card_ref: Callable[[str], str]) -> Callable[[Record], Decoded | Tick]:
    """`decode_record`, tokenizing card ids at the edge when `card_ref` is a token function.

    Everything after the decoder (entity keys, recovery snapshots, held events, alerts, dead
    letters, error messages) then sees only the token: a transaction's `card_id` is replaced, and
    so is the `card_id` member of every raw payload kept for a dead letter
    (`features.privacy.tokenize_raw`). Without a key the plain decoder runs, at no cost.
    """
    if card_ref is identity:
        return decode_record
    replace = msgspec.structs.replace

    def decode_tokenized(record: Record) -> Decoded | Tick:
        e = decode_record(record)
        if type(e) is Transaction:
            return replace(e, card_id=card_ref(e.card_id), raw=tokenize_raw(e.raw, card_ref))
        if type(e) is DeadLetter or type(e) is Label:
            return replace(e, raw=tokenize_raw(e.raw, card_ref))
        return e

    return decode_tokenized


def in_order(items: list[Any]) -> list[Any]:
    """Bytewax hands a keyed step its batch grouped by key; apply it in canonical order."""
    items.sort(key=_seq)
    return items


_seq = operator.attrgetter("seq")


def is_valid(event: Decoded | Tick) -> TypeGuard[Transaction | Label | Tick]:
    return not isinstance(event, DeadLetter)


def txn_key(event: Transaction | Label) -> str:
    return event.txn_id


def pending_key(item: Chained | Quarantined) -> str:
    """A row or label leaving the entity chain is keyed by its transaction for `pending`."""
    return item.txn.txn_id if isinstance(item, FeatureRow) else item.txn_id


Scored = FeatureVector | LabelledVector


def to_scorer(
    kv: tuple[str, Scored | Quarantined | Watermark],
) -> tuple[str, Scored | Quarantined | Watermark]:
    """Every vector, labelled vector and watermark goes to the one scorer key (one River model
    learns all)."""
    return "scorer", kv[1]


def partitions(source: Any) -> int:
    """How many partitions `source` reads (each sends its own watermarks); 1 if it cannot say."""
    list_parts = getattr(source, "list_parts", None)
    return len(list_parts()) if list_parts is not None else 1


def joined_value(kv: tuple[str, Chained | DeadLetter]) -> bool:
    return not isinstance(kv[1], DeadLetter)


def is_decision(item: Decision | DeadLetter) -> TypeGuard[Decision]:
    return type(item) is not DeadLetter


def entity_key(plan: EntityPlan) -> Callable[[Chained | Quarantined], str]:
    """Key of `plan`'s chain step; an item whose entity is absent gets a private pass-through key."""
    i = plan.position

    def key(item: Chained | Quarantined) -> str:
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

    pipeline: FeaturePipeline
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
            try:
                if isinstance(item, Label):
                    out.append(join_label(item.txn_id, self.entry, item))
                elif self.entry is not None:
                    out.append(duplicate_txn(item))
                else:
                    row, self.entry = self.config.pipeline.start(item)
                    out.append(row)
            except Exception as exc:
                out.append(quarantine(item, "index", exc).dead)
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


class EntityLogic(
    Relaying, StatefulBatchLogic[Chained | Quarantined, Chained | Quarantined, tuple[Any, ...] | RelayState]
):
    """Keyed by one entity (card, merchant, device...): adds its window features to each row.

    Idle keys are dropped: `notify_at` fires once the key's retention has passed in wall-clock
    time since its last event (event time runs at wall-clock speed in production; a fast replay
    keeps every key until it ends), and `on_notify` discards the key if it has expired.
    """

    def __init__(
        self, pipeline: FeaturePipeline, plan: EntityPlan, resume: tuple[Any, ...] | RelayState | None
    ) -> None:
        self.pipeline, self.plan = pipeline, plan
        if isinstance(resume, RelayState):
            self.relay, resume = Relay(None, resume), None
        self.state: EntityState | None = None if resume is None else self.plan.restore(resume)
        self.idle_until = datetime.now(UTC) + timedelta(milliseconds=self.plan.retention_ms)

    def on_batch(self, items: list[Any]) -> tuple[list[Any], bool]:
        if self.relay is not None or type(items[0]) is Watermark:
            return self._relay_batch(items)
        p, plan = self.pipeline, self.plan
        items = in_order(items)
        for n, item in enumerate(items):
            try:
                if self.state is None and item.keys[plan.position] is not None:
                    self.state = plan.new_state()
                if isinstance(item, FeatureRow):
                    p.observe(plan, self.state, item)
                elif self.state is not None and type(item) is LabelEvent:
                    p.observe_label(plan, self.state, item)
            except Exception as exc:
                items[n] = quarantine(item, f"{self.plan.entity.name}_features", exc, len(p.plans))
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


class PendingLogic(
    Relaying, StatefulBatchLogic[Chained | Quarantined, Scored | Quarantined, bytes | RelayState]
):
    """Keyed by txn_id, after the entity chain: assembles the transaction's feature vector, passes
    it on to be scored and keeps a copy until its label arrives (or `ttl` of wall-clock time
    passes, as in the index), then sends the label with that copy for the online model to learn.

    One small key per transaction instead of a dict inside the scorer: Bytewax snapshots only the
    keys an epoch touched, while the scorer's single key is snapshotted whole at every epoch.
    """

    held = 0  # vectors held by this process's keys (the `fraud_pending_transactions` gauge)

    def __init__(self, pipeline: FeaturePipeline, ttl: timedelta, resume: bytes | RelayState | None) -> None:
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
        out: list[Scored | Quarantined] = []
        for it in in_order(items):
            if type(it) is Quarantined:
                out.append(it)
                continue
            try:
                if isinstance(it, FeatureRow):
                    values = self.pipeline.assemble(it)
                    out.append(FeatureVector(it.txn, values, it.late))
                    if self.values is None:
                        PendingLogic.held += 1
                    self.values = array("d", values)
                    continue
                telemetry.LABELS.labels(is_fraud="true" if it.is_fraud else "false").inc()
                if self.values is not None:  # None: the row expired, or never came (dead-lettered)
                    out.append(LabelledVector(it.txn_id, it.is_fraud, self.values, it.seq))
                    self.values = None
                    PendingLogic.held -= 1
            except Exception as exc:
                out.append(quarantine(it, "pending", exc))
        telemetry.PENDING.set(PendingLogic.held)
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


ScorerState = tuple[tuple[Any, ...], list[Scored | Quarantined], RelayState]


class ScoringLogic(StatefulBatchLogic[Scored | Quarantined | Watermark, Decision | DeadLetter, ScorerState]):
    """Scores feature vectors in vectorised batches and feeds labelled vectors to River, in
    canonical order: it holds what arrives until the watermark from every `pending` worker has
    passed it (the River model's state depends on the order it learns and predicts in)."""

    def __init__(
        self, new_scorer: Callable[[], Scorer], resume: ScorerState | tuple[Any, ...] | None
    ) -> None:
        self.scorer = new_scorer()
        held: tuple[list[Scored | Quarantined], RelayState] | None = None
        if resume is not None and len(resume) == 3 and isinstance(resume[2], RelayState):
            held = (resume[1], resume[2])
            resume = resume[0]
        if resume is not None:  # or a snapshot from before the canonical order: the models alone
            self.scorer.restore(resume)
        self.batch = OrderedBatch("score", None, held)

    def on_batch(
        self, items: list[Scored | Quarantined | Watermark]
    ) -> tuple[list[Decision | DeadLetter], bool]:
        return self._score(self.batch.take(items)[0])

    def notify_at(self) -> datetime | None:
        return self.batch.notify_at()

    def on_notify(self) -> tuple[list[Decision | DeadLetter], bool]:
        return self._score(self.batch.overdue())

    def on_eof(self) -> tuple[list[Decision | DeadLetter], bool]:
        return self._score(self.batch.drain())

    def _score(self, items: list[Scored | Quarantined]) -> tuple[list[Decision | DeadLetter], bool]:
        if not items:
            return [], StatefulBatchLogic.RETAIN
        scored = [it for it in items if not isinstance(it, Quarantined)]
        dead = [it.dead for it in items if isinstance(it, Quarantined)] if len(scored) < len(items) else []
        started = time.perf_counter()
        decisions = self.scorer.decide(scored)
        stats = self.scorer.last
        if stats.rows:
            telemetry.SCORING_SECONDS.observe(time.perf_counter() - started)
            telemetry.SCORING_BATCH.observe(stats.rows)
        telemetry.ONLINE_LEARNED.inc(stats.labels_learned)
        count_decisions(decisions)
        if stats.unexplained:
            telemetry.UNEXPLAINED_ALERTS.inc(stats.unexplained)
        dead += [quarantine(it, "score", exc).dead for it, exc in stats.failed]
        out: list[Decision | DeadLetter] = [*decisions, *dead]
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> ScorerState:
        held, relay = self.batch.snapshot()
        return (self.scorer.snapshot(), held, relay)
