"""The logic of each stateful flow step: thin adapters from Bytewax to `features` and `models`.

Each class holds compact, plain state and returns a cheap, immutable snapshot: Bytewax calls
`snapshot()` for every touched key at every epoch close, with or without recovery.
"""

from __future__ import annotations

import logging
import time
from array import array
from bisect import bisect_right, insort
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any, ClassVar, TypeGuard

import msgspec
from msgspec.structs import replace

from features.engine import (
    FeaturePipeline,
    FeatureRow,
    FeatureVector,
    LabelEvent,
    TxnEntry,
    duplicate_txn,
    label_event,
)
from features.events import (
    MAX_FIELD_CHARS,
    Control,
    DeadLetter,
    Decoded,
    Label,
    Record,
    Transaction,
    decode,
    encode,
)
from features.plan import EntityPlan
from features.privacy import identity, signed, tokenize_raw
from features.table import pack_vector, unpack_vector
from flows.expiry import Arrivals, Expired, Expiry
from flows.ordering import StepLogic
from flows.outputs import count_decisions, iso_ms
from flows.routing import Shards
from flows.shards import ShardTable, StateFiles
from flows.stamping import TICK, Tick, Watermark, arrival_ns, partition_of
from models.drift import DriftEvent, DriftMonitor
from models.serving import BatchStats, Decision, LabelledVector, Scorer
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
    if isinstance(item, Control):  # a command the scorer could not apply
        return DeadLetter("control", "bad_control", detail, item.raw, None, item.origin)
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


def decode_record(record: Record | Decoded) -> Decoded | Tick:
    """Decode at the edge, stamping its arrival time (latency: `flows.stamping.arrival_ns`, the
    time Redis added it); `flows.ordering.StampLogic` then gives each event its place in the
    canonical order (`seq`). An event its source decoded already (the file replay:
    `flows.file_source`) passes as it is."""
    if not isinstance(record, tuple):
        return record
    kind, raw, origin = record
    if kind == TICK:
        return Tick(partition_of(origin))
    return decode(kind, raw, arrival_ns(origin, time.time_ns()), 0, origin)


def decoder(
    card_ref: Callable[[str], str], command_key: bytes | None = None
) -> Callable[[Record], Decoded | Tick]:
    """`decode_record`, tokenizing card ids at the edge when `card_ref` is a token function, and
    refusing operator commands not signed with `command_key` when there is one (a `bad_control`
    dead letter: an unsigned command never reaches the scorer).

    Everything after the decoder (entity keys, recovery snapshots, held events, alerts, dead
    letters, error messages) then sees only the token: a transaction's `card_id` is replaced, and
    so is the `card_id` member of every raw payload kept for a dead letter
    (`features.privacy.tokenize_raw`). Without a key the plain decoder runs, at no cost.
    """
    decode = decode_record if command_key is None else _verifying(command_key)
    if card_ref is identity:
        return decode
    replace = msgspec.structs.replace

    def decode_tokenized(record: Record) -> Decoded | Tick:
        e = decode(record)
        if type(e) is Transaction:
            return replace(e, card_id=card_ref(e.card_id), raw=tokenize_raw(e.raw, card_ref))
        if type(e) is DeadLetter or type(e) is Label:
            return replace(e, raw=tokenize_raw(e.raw, card_ref))
        return e

    return decode_tokenized


def _verifying(key: bytes) -> Callable[[Record], Decoded | Tick]:
    """`decode_record`, with every `Control` checked against its signature under `key`."""
    check = signed(key)

    def decode_verified(record: Record) -> Decoded | Tick:
        e = decode_record(record)
        if type(e) is Control and not check(e.command, e.version, e.digest, e.sig):
            why = (
                "not signed with FRAUD_COMMAND_KEY"
                if not e.sig
                else "its signature does not match FRAUD_COMMAND_KEY"
            )
            return DeadLetter("control", "bad_control", f"command refused: {why}", e.raw, None, e.origin)
        return e

    return decode_verified


def is_valid(event: Decoded | Tick) -> TypeGuard[Transaction | Label | Tick]:
    return not isinstance(event, DeadLetter)


def txn_key(shards: Shards) -> Callable[[Transaction | Label | Expired], str]:
    """The key of the index: the shard (`flows.shards`) of an event's transaction."""
    of = shards.of

    def key(event: Transaction | Label | Expired) -> str:
        return of(event.txn_id)

    return key


def pending_key(shards: Shards) -> Callable[[Chained | Quarantined | Expired], str]:
    """The key of `pending`: a row or label leaving the entity chain goes to its transaction's shard."""
    of = shards.of

    def key(item: Chained | Quarantined | Expired) -> str:
        return of(item.txn.txn_id if isinstance(item, FeatureRow) else item.txn_id)

    return key


Scored = FeatureVector | LabelledVector | Control


def scorer_key(shards: Shards) -> Callable[[Scored | Quarantined], str]:
    """The key of the scorer: a vector is scored by the replica (`ordered(per_worker=True)`) on the
    worker of its transaction's shard: where `pending` sent it from, so it does not cross to another
    process. Every replica learns the same labels in the same order, so any replica scores it the
    same."""
    of = shards.of

    def key(item: Scored | Quarantined) -> str:
        return of(item.txn.txn_id if type(item) is FeatureVector else item.txn_id)  # type: ignore[union-attr]

    return key


def to_every_replica(item: Scored | Quarantined) -> bool:
    """A labelled vector goes to every scorer replica (each learns every label), and so does a
    command (each replica switches model at the same place)."""
    return type(item) is LabelledVector or type(item) is Control


def chain_filters(pipeline: FeaturePipeline) -> tuple[Callable[[Any], bool], Callable[[Any], bool]]:
    """Which items go through the entity chain, and which skip it to `pending`: a label goes
    through only if it is a fraud label and a feature of some entity counts labels (the other
    labels change no entity's state), and so does an `Expired`. Watermarks go both ways."""
    uses_labels = any(plan.uses_labels for plan in pipeline.plans)

    def needs_chain(kv: tuple[str, Any]) -> bool:
        it = kv[1]
        t = type(it)
        return t is FeatureRow or t is Watermark or (uses_labels and t is LabelEvent and it.is_fraud)

    def skips_chain(kv: tuple[str, Any]) -> bool:
        t = type(kv[1])
        return t is Watermark or (t is not FeatureRow and t is not DeadLetter and not needs_chain(kv))

    return needs_chain, skips_chain


def partitions(source: Any) -> int:
    """How many partitions `source` reads (each sends its own watermarks); 1 if it cannot say."""
    list_parts = getattr(source, "list_parts", None)
    return len(list_parts()) if list_parts is not None else 1


def is_dead_letter(event: Any) -> bool:
    return type(event) is DeadLetter


def dead_letter_of(kv: tuple[str, Any]) -> DeadLetter | None:
    """The dead letter of a keyed step's output item (the index's unknown or duplicate records, the
    scorer's failures), or None."""
    return kv[1] if type(kv[1]) is DeadLetter else None


def decision_of(kv: tuple[str, Any]) -> Decision | None:
    """The decision of a scorer output item, or None (a dead letter or a drift event)."""
    return kv[1] if type(kv[1]) is Decision else None


def drift_of(kv: tuple[str, Any]) -> DriftEvent | None:
    """The drift event of a scorer output item, or None."""
    return kv[1] if type(kv[1]) is DriftEvent else None


def entity_key(plan: EntityPlan, shards: Shards) -> Callable[[Chained | Quarantined], str]:
    """Key of `plan`'s chain step: the shard (`flows.shards`) of the item's entity; an item
    whose entity is absent passes through the shard of its transaction."""
    i, of = plan.position, shards.of

    def key(item: Chained | Quarantined) -> str:
        # `_entity_or_txn`, inlined: called for every item at each of the step's two routings
        k = item.keys[i]
        if k is None:
            k = item.txn.txn_id if type(item) is FeatureRow else item.txn_id  # type: ignore[union-attr]
        return of(k)

    return key


def _entity_or_txn(item: Chained | Quarantined, position: int) -> str:
    k = item.keys[position]
    if k is not None:
        return k
    return item.txn.txn_id if type(item) is FeatureRow else item.txn_id  # type: ignore[union-attr]


entry_bytes = msgspec.msgpack.Encoder().encode  # a `TxnEntry` as an index shard stores it
_entry_of = msgspec.msgpack.Decoder(TxnEntry).decode


# A parked label's entry in an index shard: PARKED + its seq, longer than any transaction id can be.
PARKED = "\x00" * (MAX_FIELD_CHARS + 1)
_label_bytes = entry_bytes  # (the same msgpack encoder)
_label_of = msgspec.msgpack.Decoder(Label).decode
_seq = attrgetter("seq")


def labelled(bucket: int) -> bytes:
    """The value of a labelled entry that arrived in `bucket`."""
    return entry_bytes(TxnEntry(0, (), True, bucket))


class IndexLogic(ShardTable):
    """One shard (`flows.shards`) of the transaction index: rejects duplicate transactions and
    joins labels to their transaction.

    With an `Expiry`, an entry lives `FRAUD_LABEL_TTL_DAYS` of wall-clock time after the bucket
    it arrived in (`flows.expiry`): the shard then drops it and sends its `Expired` on to
    `pending`; a label for a transaction never seen, expired, or already labelled, becomes a dead
    letter. A labelled entry keeps only that it was labelled, and its bucket (`labelled`), to
    turn a second label away until then. Entries are held as their `TxnEntry`'s msgpack bytes in
    a compact table (`features.table`): millions wait weeks.
    """

    __slots__ = ("arrivals", "due_at", "expiry", "parks", "pipeline", "waiting", "waiting_ids")
    value_type = bytes
    compact = True

    def __init__(
        self,
        pipeline: FeaturePipeline,
        files: StateFiles | None,
        resume: Any,
        expiry: Expiry | None = None,
        parks: bool = False,
        shards: Shards | None = None,
    ) -> None:
        self.pipeline, self.expiry, self.parks = pipeline, expiry, parks
        self.arrivals = Arrivals()
        self.due_at: datetime | None = None
        self.waiting: list[Label] = []  # parked labels, in seq order
        self.waiting_ids: dict[str, int] = {}  # how many parked labels each transaction has
        super().__init__(files, resume, shards)
        if self.items:  # a resumed shard: its buckets and its parked labels, from its entries
            for k, v in self.items.items():
                if k.startswith(PARKED):  # its seq (wider than msgpack's ints) is in its key
                    self._wait(replace(_label_of(v), seq=int(k[len(PARKED) :])))
                elif expiry is not None:
                    self.arrivals.add(_entry_of(v).bucket, k)
            if expiry is not None:
                self.arrivals.sort()
                self._next_due()

    def apply(self, events: list[Transaction | Label]) -> list[Chained | DeadLetter | Expired]:
        if self.shard is None:
            self.name(events[0].txn_id)
        out: list[Chained | DeadLetter | Expired] = []
        bucket = 0
        expiry = self.expiry
        if expiry is not None:
            now = expiry.clock()
            bucket = int(now) // expiry.seconds
            if self.due_at is not None and now >= self.due_at.timestamp():
                out += self._expire(bucket)
        items = self.own()
        for item in events:
            t = type(item)
            if t is Control:  # for the scorer: it keys no transaction
                out.append(item)  # type: ignore[arg-type]
                continue
            try:
                if t is Label:
                    if self.parks and (item.txn_id not in items or item.txn_id in self.waiting_ids):
                        self.put(PARKED + str(item.seq), _label_bytes(replace(item, seq=0)))
                        self._wait(item)  # type: ignore[arg-type]
                    else:
                        out.append(self._join(items, item))  # type: ignore[arg-type]
                elif item.txn_id in items:
                    out.append(duplicate_txn(item))  # type: ignore[arg-type]
                else:
                    row, entry = self.pipeline.start(item)  # type: ignore[arg-type]
                    if expiry is not None:
                        entry.bucket = bucket
                        self.arrivals.add(bucket, item.txn_id)
                    self.put(item.txn_id, entry_bytes(entry))
                    out.append(row)
            except Exception as exc:
                out.append(quarantine(item, "index", exc).dead)
        if expiry is not None and self.due_at is None and len(self.arrivals):
            self._next_due()
        return out

    def _join(self, items: Any, label: Label) -> LabelEvent | DeadLetter:
        held = items.get(label.txn_id)
        entry = None if held is None else _entry_of(held)
        joined = label_event(label.txn_id, entry, label)
        if type(joined) is LabelEvent:
            self.put(label.txn_id, labelled(entry.bucket))  # type: ignore[union-attr]
        return joined

    def _wait(self, label: Label) -> None:
        insort(self.waiting, label, key=_seq)  # labels from several partitions: not in seq order
        self.waiting_ids[label.txn_id] = self.waiting_ids.get(label.txn_id, 0) + 1

    def parked(self) -> Label | None:
        """With several partitions (`parks`), a label whose transaction is not here yet waits
        until the watermark passes it: its transaction, read from another partition, may still
        come (and so does a later label of the same transaction, to keep their order)."""
        return self.waiting[0] if self.waiting else None

    def unpark(self, upto: int | None) -> list[Any]:
        waiting = self.waiting
        cut = len(waiting) if upto is None else bisect_right(waiting, upto, key=_seq)
        ready, self.waiting = waiting[:cut], waiting[cut:]
        items = self.own()
        out: list[Any] = []
        for label in ready:
            self.drop(PARKED + str(label.seq))
            left = self.waiting_ids.pop(label.txn_id) - 1
            if left:
                self.waiting_ids[label.txn_id] = left
            try:
                out.append(self._join(items, label))
            except Exception as exc:
                out.append(quarantine(label, "index", exc).dead)
        return out

    def _expire(self, bucket: int) -> list[Expired]:
        """Drop the entries whose time is up at `bucket`; their `Expired`s, for `pending`."""
        assert self.expiry is not None
        items = self.own()
        out: list[Expired] = []
        for b, txn_id in self.arrivals.due(bucket - self.expiry.buckets):
            held = items.get(txn_id)
            if held is not None and _entry_of(held).bucket == b:  # not a later entry of the same id
                self.drop(txn_id)
                out.append(Expired(txn_id))
        self._next_due()
        return out

    def _next_due(self) -> None:
        assert self.expiry is not None
        oldest = self.arrivals.oldest()
        self.due_at = (
            None
            if oldest is None
            else datetime.fromtimestamp((oldest + self.expiry.buckets) * self.expiry.seconds, UTC)
        )

    def wake_at(self) -> datetime | None:
        """When the oldest bucket's entries expire (a shard that gets no batch meanwhile)."""
        return self.due_at

    def wake(self) -> tuple[list[Any], bool]:
        if self.expiry is None or self.due_at is None:
            return [], False
        return self._expire(self.expiry.bucket()), False


SWEEP = timedelta(hours=1)  # how often an entity shard looks for keys that went idle
MINUTE_S = 60


class EntityLogic(ShardTable):
    """One shard (`flows.shards`) of an entity step (card, merchant, device...): the feature
    state of each of its entities, which adds the entity's window features to each row.

    An entity idle for its retention is dropped: once an hour (`SWEEP`) the shard drops each key
    whose last event arrived more than a retention ago in wall-clock time and whose newest event
    time has left every window (event time runs at wall-clock speed in production; a fast replay
    keeps every key until it ends). One wall-clock timer per shard, whatever the number of keys:
    Bytewax scans every timer of a step at every activation. A resumed shard counts its keys as
    seen at the resume.
    """

    __slots__ = ("pipeline", "plan", "seen", "sweep_at")
    value_type = tuple[str, str, str, bytes, tuple[bytes, bytes] | None]  # `EntityState.snapshot`
    mutable = True

    def __init__(
        self,
        pipeline: FeaturePipeline,
        plan: EntityPlan,
        files: StateFiles | None,
        resume: Any,
        shards: Shards | None = None,
    ) -> None:
        self.pipeline, self.plan = pipeline, plan
        super().__init__(files, resume, shards)
        self.seen: dict[str, int] = dict.fromkeys(self.items, int(time.time()) // MINUTE_S)
        self.sweep_at = datetime.now(UTC) + SWEEP

    def restored(self, items: dict[str, Any]) -> dict[str, Any]:
        restore = self.plan.restore
        return {k: restore(tuple(v)) for k, v in items.items()}

    def frozen(self, value: Any) -> Any:
        return value.snapshot()

    def apply(self, events: list[Any]) -> list[Any]:
        p, plan = self.pipeline, self.plan
        i = plan.position
        if self.shard is None:
            self.name(_entity_or_txn(events[0], i))
        items, changed, seen = self.own(), self.changed, self.seen
        minute = int(time.time()) // MINUTE_S
        for n, item in enumerate(events):
            try:
                k = item.keys[i]
                if k is None:
                    if type(item) is FeatureRow:
                        p.observe(plan, None, item)  # the entity is absent: its features are NaN
                    continue
                state = items.get(k)
                if state is None:
                    state = items[k] = plan.new_state()
                changed.add(k)
                seen[k] = minute
                if type(item) is FeatureRow:
                    p.observe(plan, state, item)
                elif type(item) is LabelEvent:
                    p.observe_label(plan, state, item)
            except Exception as exc:
                events[n] = quarantine(item, f"{plan.entity.name}_features", exc, len(p.plans))
        return events

    def wake_at(self) -> datetime | None:
        return self.sweep_at

    def wake(self) -> tuple[list[Any], bool]:
        """Drop the keys that went idle (see the class)."""
        now = time.time()
        idle = int(now) // MINUTE_S - self.plan.retention_ms // (MINUTE_S * 1000)
        now_ms = int(now * 1000)
        expired, items, seen = self.plan.expired, self.items, self.seen
        for k in [k for k, m in seen.items() if m < idle and expired(items[k], now_ms)]:
            del seen[k]
            self.drop(k)
        self.sweep_at = datetime.now(UTC) + SWEEP
        return [], False


_LOW64 = (1 << 64) - 1


class SavedLabel(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A `LabelEvent` waiting in `pending` as its state files keep it: msgpack's integers stop at
    64 bits and a `seq` (`flows.stamping.make_seq`: event time in milliseconds above 64 bits of
    partition and position) is wider, so it is kept as its high and low 64 bits."""

    txn_id: str
    is_fraud: bool
    ts_ms: int
    txn_ts_ms: int
    keys: tuple[str | None, ...]
    received_ns: int
    seq_high: int
    seq_low: int
    origin: str

    @classmethod
    def of(cls, e: LabelEvent) -> SavedLabel:
        return cls(
            e.txn_id,
            e.is_fraud,
            e.ts_ms,
            e.txn_ts_ms,
            e.keys,
            e.received_ns,
            e.seq >> 64,
            e.seq & _LOW64,
            e.origin,
        )

    def label(self) -> LabelEvent:
        seq = (self.seq_high << 64) | self.seq_low
        return LabelEvent(
            self.txn_id,
            self.is_fraud,
            self.ts_ms,
            self.txn_ts_ms,
            self.keys,
            self.received_ns,
            seq,
            self.origin,
        )


class PendingLogic(ShardTable):
    """One shard (`flows.shards`) of the vectors waiting for their label, after the entity chain:
    assembles each transaction's feature vector, passes it on to be scored and keeps a copy (its
    float32 values, packed: `features.table.pack_vector`, in a compact table) until its label
    arrives (or its `Expired` comes from the index), then sends the label with that copy
    (`models.serving.LabelledVector`) for the online model to learn.

    Most labels skip the entity chain (`needs_chain`), so a label may come before its row (still
    held in the chain): it waits here (the value is the `LabelEvent`) for the row. The labelled
    vector keeps the label's `seq`, so the scorer learns it at the same place in the canonical
    order either way.
    """

    __slots__ = ("pipeline",)
    value_type = bytes | SavedLabel
    compact = True  # vectors inline in a `features.table.Table`; a waiting `LabelEvent` by reference
    held: ClassVar[int] = 0  # vectors held by this process's shards (the `fraud_pending_transactions` gauge)

    def __init__(
        self, pipeline: FeaturePipeline, files: StateFiles | None, resume: Any, shards: Shards | None = None
    ) -> None:
        self.pipeline = pipeline
        super().__init__(files, resume, shards)
        PendingLogic.held += sum(type(v) is bytes for v in self.items.values())

    def storable(self, saved: dict[str, Any]) -> dict[str, Any]:
        for k, v in saved.items():
            if type(v) is LabelEvent:
                saved[k] = SavedLabel.of(v)
        return saved

    def restored(self, items: dict[str, Any]) -> dict[str, Any]:
        for k, v in items.items():
            if type(v) is SavedLabel:
                items[k] = v.label()
        return items

    def apply(self, events: list[Any]) -> list[Scored | Quarantined]:
        if self.shard is None:
            first = events[0]
            self.name(first.txn.txn_id if type(first) is FeatureRow else first.txn_id)
        items = self.own()
        out: list[Scored | Quarantined] = []
        frauds = genuine = 0  # labels seen, counted on the metric once per batch
        for it in events:
            t = type(it)
            if t is Control:
                out.append(it)
                continue
            if t is Quarantined or t is Expired:
                if t is Quarantined:
                    out.append(it)
                if type(self.drop(it.txn_id)) is bytes:
                    PendingLogic.held -= 1
                continue
            try:
                if t is FeatureRow:
                    txn_id = it.txn.txn_id
                    values = self.pipeline.assemble(it)
                    packed = pack_vector(values)
                    out.append(FeatureVector(it.txn, values, it.late, packed))
                    waiting = items.get(txn_id)
                    if type(waiting) is LabelEvent:
                        self.drop(txn_id)
                        out.append(
                            LabelledVector(
                                txn_id, waiting.is_fraud, array("f", values), waiting.seq, waiting.ts_ms
                            )
                        )
                        continue
                    if type(waiting) is not bytes:
                        PendingLogic.held += 1
                    self.put(txn_id, packed)
                    continue
                if it.is_fraud:
                    frauds += 1
                else:
                    genuine += 1
                vector = items.get(it.txn_id)
                if type(vector) is bytes:
                    self.drop(it.txn_id)
                    PendingLogic.held -= 1
                    out.append(
                        LabelledVector(it.txn_id, it.is_fraud, unpack_vector(vector), it.seq, it.ts_ms)
                    )
                else:  # the row is still in the entity chain
                    self.put(it.txn_id, it)
            except Exception as exc:
                out.append(quarantine(it, "pending", exc))
        telemetry.PENDING.set(PendingLogic.held)
        if frauds:
            telemetry.FRAUD_LABELS.inc(frauds)
        if genuine:
            telemetry.GENUINE_LABELS.inc(genuine)
        return out


class ScoringLogic(StepLogic):
    """One replica of the models per worker (`ordered(per_worker=True)`): scores the feature
    vectors routed to it in vectorised batches, and feeds River every labelled vector (each
    replica gets them all), in canonical order. Every replica learns the same labels in the same
    order, and a prediction does not change the model, so a transaction gets the same score
    whichever replica scores it: 1 worker or N decide alike."""

    def __init__(self, new_scorer: Callable[[], Scorer], resume: tuple[Any, ...] | None) -> None:
        self.scorer = new_scorer()
        if resume is not None:
            self.scorer.restore(resume)
        self.exported = (-1, -1)  # the drift watch's (windows judged, quality measured) on the gauges

    def apply(self, events: list[Scored | Quarantined]) -> list[Decision | DeadLetter | DriftEvent]:
        scored = [it for it in events if not isinstance(it, Quarantined)]
        dead = [it.dead for it in events if isinstance(it, Quarantined)] if len(scored) < len(events) else []
        started = time.perf_counter()
        decisions = self.scorer.decide(scored)
        stats = self.scorer.last
        if stats.rows:
            telemetry.SCORING_SECONDS.observe(time.perf_counter() - started)
            telemetry.SCORING_BATCH.observe(stats.rows)
        if stats.labels_learned:
            telemetry.ONLINE_LEARNED.inc(stats.labels_learned)
            telemetry.ONLINE_LEARN_SECONDS.inc(stats.learn_s)
        count_decisions(decisions)
        if stats.unexplained:
            telemetry.UNEXPLAINED_ALERTS.inc(stats.unexplained)
        dead += [quarantine(it, "score", exc).dead for it, exc in stats.failed]
        for it, exc in stats.failed:
            if type(it) is Control:
                telemetry.MODEL_COMMANDS.labels(command=it.command, result="refused").inc()
                logger.error("command %s %r refused: %s", it.command, it.version, exc)
        if stats.applied:
            self.export_model(stats.applied)
        if self.scorer.monitor is not None:
            self.export_drift(self.scorer.monitor, stats)
        return [*decisions, *dead, *stats.events]

    def export_model(self, applied: list[Control]) -> None:
        """Commands applied in this batch: counted and logged; the model-version info updated."""
        for c in applied:
            telemetry.MODEL_COMMANDS.labels(command=c.command, result="applied").inc()
            logger.warning("command applied: %s %s", c.command, c.version or "(off)")
        champion, shadow = self.scorer.champion.artifact, self.scorer.shadow
        telemetry.MODEL.info(
            {
                "version": champion.version,
                "schema_hash": champion.schema_hash[:12],
                "shadow": shadow.version if shadow is not None else "",
            }
        )
        self.exported = (-1, -1)  # a new champion's watch: refresh the gauges

    def export_drift(self, monitor: DriftMonitor, stats: BatchStats) -> None:
        """What the drift watch found in this batch: events counted and logged; the PSI gauges
        when a window was judged, the quality gauges when they were recomputed."""
        for e in stats.events:
            telemetry.DRIFT_EVENTS.labels(kind=e.kind, state=e.state).inc()
            logger.warning(
                "drift: %s %s %s (%.4g against %.4g) since %s",
                *(e.kind, e.what, e.state, e.value, e.threshold, iso_ms(e.since_ms)),
            )
        if stats.drift_error is not None:
            logger.error("the data-drift watch failed on a batch: %r", stats.drift_error)
        data, concept = monitor.data, monitor.concept
        if data is not None and data.judged != self.exported[0]:
            for name, v in zip(data.ref.names, data.last_psi, strict=True):
                telemetry.FEATURE_PSI.labels(feature=name).set(v)
        if concept.measured != self.exported[1]:
            for model, values in concept.metrics.items():
                for metric, v in values.items():
                    telemetry.MODEL_QUALITY.labels(model=model, metric=metric).set(v)
        self.exported = (data.judged if data is not None else 0, concept.measured)

    def snapshot(self) -> tuple[Any, ...]:
        return self.scorer.snapshot()
