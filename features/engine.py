"""The feature pipeline shared by training (batch) and serving (the Bytewax flow).

Serving runs the same steps as `FeatureEngine.process`, one keyed Bytewax step per entity:
`FeaturePipeline.start` (or `duplicate_txn`) / `join_label` keyed by txn_id, then
`FeaturePipeline.observe` / `observe_label` keyed by each entity (`EntityPlan`), then `assemble`.
Training replays a file through `FeatureEngine`, which holds the same per-key states in dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import msgspec

from features.buffer import NAN, EntityState
from features.events import DeadLetter, Label, Transaction, encode
from features.plan import EntityPlan
from features.spec import TXN_FEATURE_CODE, FeatureSet


class TxnEntry(msgspec.Struct, array_like=True, gc=False):
    """What a label needs, days later, to reach its transaction's entities."""

    ts_ms: int
    keys: tuple[str | None, ...]
    labelled: bool = False
    bucket: int = 0  # the wall-clock bucket it arrived in (`flows.expiry`): when it expires


class LabelEvent(msgspec.Struct, frozen=True, gc=False):
    """A label joined to its transaction: event time, entity keys (one per plan, None if absent)."""

    txn_id: str
    is_fraud: bool
    ts_ms: int
    txn_ts_ms: int
    keys: tuple[str | None, ...]
    received_ns: int = 0
    seq: int = 0
    origin: str = ""  # where the label was read: its dead letter's identity if a step fails on it


@dataclass(slots=True)
class FeatureRow:
    """A transaction on its way through the entity steps, collecting feature values.

    `seq` is the transaction's (a plain attribute: the ordered steps sort and compare rows by it
    several times a step, and a property costs a Python call each time)."""

    txn: Transaction
    keys: tuple[str | None, ...]
    parts: list[list[float]] = field(default_factory=list)
    late: bool = False
    seq: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.seq = self.txn.seq

    def __reduce__(
        self,
    ) -> tuple[type[FeatureRow], tuple[Transaction, tuple[str | None, ...], list[list[float]], bool]]:
        """Pickled as its fields (what crosses between processes in a cluster), not as a dict."""
        return FeatureRow, (self.txn, self.keys, self.parts, self.late)


def _mcc_code(mcc: str | None) -> float:
    return float(mcc) if mcc and mcc.isdigit() else NAN


_compiled: dict[tuple[str, ...], Callable[[Transaction], list[float]]] = {}


def txn_feature_function(names: tuple[str, ...]) -> Callable[[Transaction], list[float]]:
    """The function computing the features of a transaction alone (no history), in `names` order
    (each as `features.spec.TXN_FEATURE_CODE` defines it)."""
    fn = _compiled.get(names)
    if fn is None:
        src = "lambda t: [" + ", ".join(TXN_FEATURE_CODE[n] for n in names) + "]"
        fn = _compiled[names] = eval(src, {"mcc_code": _mcc_code, "NAN": NAN})
    return fn


def txn_features(txn: Transaction, names: tuple[str, ...]) -> list[float]:
    """Features of the transaction alone (no history), in the order of `names`."""
    return txn_feature_function(names)(txn)


def keys_function(plans: Sequence[EntityPlan]) -> Callable[[Transaction], tuple[str | None, ...]]:
    """Every plan's state key of a transaction (None where a key field is missing): what
    `EntityPlan.key_of` gives, as one generated expression (key fields are transaction fields,
    validated by `features.spec.Entity`)."""
    parts = []
    for p in plans:
        got = [f"t.{f}" for f in p.entity.fields]
        prefix = repr(p.entity.name + ":")
        if len(got) == 1:
            parts.append(f"({prefix} + {got[0]} if {got[0]} else None)")
        else:
            both = ", ".join(got)
            parts.append(f"({prefix} + '|'.join(({both},)) if all(({both},)) else None)")
    fn: Callable[[Transaction], tuple[str | None, ...]] = eval(
        "lambda t: (" + "".join(f"{x}, " for x in parts) + ")", {}
    )
    return fn


class FeaturePipeline:
    """The compiled feature set: one `EntityPlan` per entity, in declaration order (a plan's
    `position` is its index in `plans`, in a row's `keys` and in a `TxnEntry`'s)."""

    def __init__(self, feature_set: FeatureSet, allowed_lateness_ms: int) -> None:
        self.feature_set = feature_set
        self.plans = [
            EntityPlan(e, feature_set.for_entity(e), allowed_lateness_ms, i)
            for i, e in enumerate(feature_set.entities)
        ]
        self.names = feature_set.names
        self.schema_hash = feature_set.schema_hash
        self.txn_features = txn_feature_function(feature_set.txn)
        self.keys_of = keys_function(self.plans)

    def start(self, txn: Transaction) -> tuple[FeatureRow, TxnEntry]:
        keys = self.keys_of(txn)
        return FeatureRow(txn, keys), TxnEntry(txn.ts_ms, keys)

    def assemble(self, row: FeatureRow) -> list[float]:
        values = self.txn_features(row.txn)
        for part in row.parts:
            values.extend(part)
        return values

    def observe(self, plan: EntityPlan, state: EntityState | None, row: FeatureRow) -> None:
        """The chain's step of `plan`'s entity: add its features to `row` (NaN when its key is absent)."""
        if state is None:
            row.parts.append([NAN] * len(plan.names))
            return
        values, late = plan.observe_fn(state, row.txn)
        row.parts.append(values)
        row.late = row.late or late

    def observe_label(self, plan: EntityPlan, state: EntityState, label: LabelEvent) -> None:
        if label.is_fraud:
            plan.observe_label(state, label.txn_ts_ms, label.ts_ms)


def join_label(txn_id: str, entry: TxnEntry | None, label: Label) -> LabelEvent | DeadLetter:
    """Attach a label to its remembered transaction (marking it labelled), or explain why it
    cannot be used."""
    joined = label_event(txn_id, entry, label)
    if entry is not None and type(joined) is LabelEvent:
        entry.labelled = True
    return joined


def label_event(txn_id: str, entry: TxnEntry | None, label: Label) -> LabelEvent | DeadLetter:
    """`join_label` without marking `entry`: the flow's index replaces a labelled entry instead
    (its values stay immutable, so a snapshot can share them)."""
    raw = label.raw or encode(label).decode()
    if entry is None:
        return DeadLetter(
            "label",
            "unknown_txn",
            f"no transaction {txn_id!r} seen (or it expired)",
            raw,
            txn_id,
            label.origin,
        )
    if entry.labelled:
        return DeadLetter(
            "label",
            "duplicate_label",
            f"transaction {txn_id!r} is already labelled",
            raw,
            txn_id,
            label.origin,
        )
    return LabelEvent(
        txn_id, label.is_fraud, label.ts_ms, entry.ts_ms, entry.keys, label.received_ns, label.seq,
        label.origin,
    )  # fmt: skip


def duplicate_txn(txn: Transaction) -> DeadLetter:
    """The second arrival of a transaction id: scored once, the copy dead-lettered as received."""
    raw = txn.raw or encode(txn).decode()
    detail = f"transaction {txn.txn_id!r} was already seen"
    return DeadLetter("txn", "duplicate_txn", detail, raw, txn.txn_id, txn.origin)


@dataclass(slots=True)
class FeatureVector:
    """A transaction with its feature vector (batch-mode output; the flow's scorer input).

    `packed`: the values as `features.table.pack_vector` packs them, when the flow's `pending`
    step has packed them already (to keep until the label): the scorer builds its float32
    matrix from them without converting each value again. None elsewhere."""

    txn: Transaction
    values: list[float]
    late: bool
    packed: bytes | None = None

    @property
    def seq(self) -> int:
        return self.txn.seq

    def __reduce__(
        self,
    ) -> tuple[type[FeatureVector], tuple[Transaction, list[float], bool, bytes | None]]:
        """Pickled as its fields (what crosses between processes in a cluster)."""
        return FeatureVector, (self.txn, self.values, self.late, self.packed)


EXPIRY_EVERY = 100_000


class FeatureEngine:
    """Batch mode: replay events in arrival order through the same steps the flow runs."""

    def __init__(self, pipeline: FeaturePipeline, index_ttl_ms: int | None = None) -> None:
        """`index_ttl_ms`: how long (event time, behind the newest transaction) a transaction
        waits for its label; a label or a repeat of its id after that finds nothing, whenever
        the periodic sweep drops the entry. None keeps every transaction, 0 keeps none
        (features only: no labels, no duplicate detection)."""
        self.pipeline = pipeline
        self.index_ttl_ms = index_ttl_ms
        self.index: dict[str, TxnEntry] = {}
        self.states: list[dict[str, EntityState]] = [{} for _ in pipeline.plans]
        self.watermark = -(2**62)
        self._until_sweep = EXPIRY_EVERY
        # Per plan, pre-bound for the per-transaction loop: key function, states, observe, new state,
        # and the values of a transaction without this entity.
        self._plans = [
            (p.key_of, states, p.observe_fn, p.new_state, [NAN] * len(p.names))
            for p, states in zip(pipeline.plans, self.states, strict=True)
        ]

    def process(self, event: Transaction | Label | DeadLetter) -> FeatureVector | LabelEvent | DeadLetter:
        p = self.pipeline
        if isinstance(event, DeadLetter):
            return event
        if isinstance(event, Label):
            joined = join_label(event.txn_id, self._remembered(event.txn_id), event)
            if isinstance(joined, LabelEvent):
                for plan, key in zip(p.plans, joined.keys, strict=True):
                    if key is not None:
                        p.observe_label(plan, self._state(plan, key), joined)
            return joined
        if self._remembered(event.txn_id) is not None:
            return duplicate_txn(event)
        t = event.ts_ms
        if t > self.watermark:
            self.watermark = t
        self._until_sweep -= 1
        if not self._until_sweep:
            self._expire()
        values = p.txn_features(event)
        late = False
        keys = []
        for key_of, states, observe, new_state, absent in self._plans:
            key = key_of(event)
            keys.append(key)
            if key is None:
                values += absent
                continue
            state = states.get(key)
            if state is None:
                state = states[key] = new_state()
            part, part_late = observe(state, event)
            values += part
            if part_late:
                late = True
        if self.index_ttl_ms != 0:
            self.index[event.txn_id] = TxnEntry(t, tuple(keys))
        return FeatureVector(event, values, late)

    def _remembered(self, txn_id: str) -> TxnEntry | None:
        """`txn_id`'s entry unless its time is up: whether the sweep has dropped it yet or not."""
        entry = self.index.get(txn_id)
        if entry is not None and self.index_ttl_ms and entry.ts_ms < self.watermark - self.index_ttl_ms:
            return None
        return entry

    def _expire(self) -> None:
        """Every `EXPIRY_EVERY` transactions, drop keys whose newest event left every window."""
        self._until_sweep = EXPIRY_EVERY
        if self.index_ttl_ms:
            oldest = self.watermark - self.index_ttl_ms
            for txn_id in [t for t, e in self.index.items() if e.ts_ms < oldest]:
                del self.index[txn_id]
        for plan, states in zip(self.pipeline.plans, self.states, strict=True):
            for key in [k for k, s in states.items() if plan.expired(s, self.watermark)]:
                del states[key]

    def _state(self, plan: EntityPlan, key: str) -> EntityState:
        states = self.states[plan.position]
        s = states.get(key)
        if s is None:
            s = states[key] = plan.new_state()
        return s

    def run(
        self, events: Iterable[Transaction | Label | DeadLetter]
    ) -> Iterator[FeatureVector | LabelEvent | DeadLetter]:
        for e in events:
            yield self.process(e)
