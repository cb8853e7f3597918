"""One event-time order for every cluster layout: the same alerts from 1 process or N.

Bytewax hands a keyed step its items in arrival order, and with several workers that order
depends on timing. So each event gets a canonical position, `seq`, from the partition it was
read from (`flows.stamping.stamp`), and every step applies its events in `seq` order, only once no smaller
`seq` can still arrive. Each step of the flow is one `ordered` operator, which owns all of it
and runs a plain `StepLogic` (`flows.steps`) on the events in order:

- `seq` (`flows.stamping`) grows along each partition and depends only on what the partition
  holds, so it is the same in every run and after a resume.
- After each batch a partition sends a `Watermark`: "nothing I send from now on is at or below
  this seq". A `Relay` keeps the latest one per upstream origin; their minimum is the step's
  watermark.
- A step keyed by entity (card, merchant...) cannot wait for a watermark: Bytewax wakes a key
  only for its own items. With `sequence=True`, a bucket per worker in front of it
  (`SequencerLogic`) holds the events and releases them in `seq` order up to the watermark.
  Each entity key gets its events from one bucket, on one channel, so they arrive in that order.
- With `per_worker=True` the bucket runs the logic itself (the scorer: one replica per worker).
- A keyed step without buckets may still park the few events that arrive ahead of the order
  (`Parking`): the index parks a label whose transaction, from another partition, is not there
  yet, and its worker's relay forwards no watermark past it until it has gone out.
- Watermarks travel with the events, through every worker of every step: `Workers.worker_keys()`
  (`flows.routing`) are keys that Bytewax routes to each worker, and a step forwards the
  watermark only after the events it covers (those keys sort after any entity key, and Bytewax
  runs a batch's keys in key order). A step that merges several inputs tags each input's
  watermarks and waits for all of them.

A partition with nothing to read for `FRAUD_SOURCE_IDLE_MS` says so (an idle `Watermark`) and
stops holding the others back; events it sends after that may arrive behind the order (they are
applied at once). Everything else is exact.
"""

from __future__ import annotations

import logging
import pickle
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from operator import attrgetter
from time import perf_counter
from typing import Any, cast

import bytewax.operators as op
import msgspec
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from flows.batch import opened
from flows.reporting import reported
from flows.routing import Workers
from flows.stamping import NEG, Watermark
from service.telemetry import ORDER_HELD, ORDER_LATE, snapshot_timer, step_timer

logger = logging.getLogger(__name__)

MAX_HOLD = timedelta(seconds=30)  # no watermark for this long: release what is held (see notify_at)


# --- routing ------------------------------------------------------------------------------------

FAN = 1 << 16  # the i-th input of a merged step tags its watermarks' origins `i * FAN + worker`


def broadcast(mark: Watermark, workers: Workers) -> list[tuple[str, Watermark]]:
    return [(k, Watermark(mark.origin, mark.wm, j, mark.idle)) for j, k in enumerate(workers.worker_keys())]


Router = Callable[[list[tuple[str, Any]]], list[tuple[str, Any]]]


# A router sends a batch's events as bundles: one list per destination key, in arrival order,
# so the keyed step that follows gets one item per key and batch instead of one per event (Bytewax
# pays per item it routes to a key). Watermarks go after the bundles: a watermark that comes later
# than the events it covers is still true, one that overtook them would not be. `unbundle` gives
# the step its events back.


class Bundle(list[Any]):
    """A router's list of events for one key. One that crosses to another process is pickled
    once: Bytewax pickles an item for another process twice (timely sizes the message by
    serialising it, then writes it), so the bundle keeps its pickled events and hands the same
    bytes to the second pickling. The other side gets a plain list."""

    __slots__ = ("wire",)
    wire: bytes

    def __reduce__(self) -> tuple[Callable[[bytes], list[Any]], tuple[bytes]]:
        try:
            wire = self.wire
        except AttributeError:
            wire = self.wire = pickle.dumps(list(self), pickle.HIGHEST_PROTOCOL)
        return pickle.loads, (wire,)


def bundled(events: list[Any], bundles: bool) -> list[Any]:
    """What a step hands Bytewax for `events`: one list of them when the step's output is
    `opened` after it (`bundles`), else the events themselves."""
    if bundles:
        return [events] if events else events
    return events


def unbundle(items: list[Any]) -> list[Any]:
    """A keyed step's batch with its bundles (lists of events) opened, in arrival order."""
    if not any(isinstance(i, list) for i in items):
        return items
    out: list[Any] = []
    for i in items:
        if isinstance(i, list):
            out += i
        else:
            out.append(i)
    return out


def by_key(key_of: Callable[[Any], str], workers: Workers) -> Router:
    """Route the events of a batch of keyed items to `key_of(event)`, bundled per key, and each
    watermark to every worker (for `op.flat_map_batch`: one call per batch)."""

    def route(batch: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        bundles: dict[str, Bundle] = {}
        marks: list[tuple[str, Any]] = []
        for _, item in batch:
            if type(item) is Watermark:
                marks += broadcast(item, workers)
            else:
                k = key_of(item)
                bundle = bundles.get(k)
                if bundle is None:
                    bundles[k] = Bundle((item,))
                else:
                    bundle.append(item)
        return [*bundles.items(), *marks]

    return route


def by_bucket(
    key_of: Callable[[Any], str], workers: Workers, everywhere: Callable[[Any], bool] | None = None
) -> Router:
    """Route each event to the bucket (one per worker) of `key_of(event)`, bundled per bucket, and
    each watermark, and each event `everywhere` says so of, to every bucket.

    A key's bucket is the worker Bytewax runs that key on (`Workers.of`), so the events a bucket
    releases to their keys stay in its process (no pickling between processes for that hop);
    `key_of` returns shard keys (`flows.shards`), few enough for `Workers.of` to remember."""

    def route(batch: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        keys = workers.worker_keys()
        bundles = [Bundle() for _ in keys]
        marks: list[tuple[str, Any]] = []
        for _, item in batch:
            if type(item) is Watermark:
                marks += broadcast(item, workers)
            elif everywhere is not None and everywhere(item):
                for bundle in bundles:
                    bundle.append(item)
            else:
                bundles[workers.of(key_of(item))].append(item)
        return [*((k, b) for k, b in zip(keys, bundles, strict=True) if b), *marks]

    return route


# --- relaying and sequencing --------------------------------------------------------------------


class RelayState(msgspec.Struct, array_like=True):
    """A relay's snapshot (a class of its own, so a step can tell it from its keys' states)."""

    to: int
    marks: dict[str | int, int]
    idle: list[str | int]
    out: int | None


class Relay:
    """The watermark of one key of a step: the minimum over its upstream origins (partitions, or
    the workers of the step(s) before), once all of them have spoken; it only ever grows.

    `expected`: how many origins (None: one per worker of each of the `fan` inputs). Idle
    partitions do not hold it back; when every partition is idle it is the largest watermark seen.
    """

    def __init__(
        self, expected: int | None, workers: Workers, state: RelayState | None = None, fan: int = 1
    ) -> None:
        self.expected, self.workers, self.fan = expected, workers, fan
        s = state or RelayState(-1, {}, [], None)
        self.to, self.marks, self.idle, self.out = s.to, dict(s.marks), set(s.idle), s.out

    def update(self, marks: Iterable[Watermark], parking: Parking | None = None) -> Watermark | None:
        """Take in `marks`; the watermark to forward if it advanced. With `parking`, tell it the
        watermark this worker has seen, and forward none at or past an event parked here."""
        for m in marks:
            self.to = m.to
            prev = self.marks.get(m.origin)
            self.marks[m.origin] = m.wm if prev is None or m.wm > prev else prev
            if m.idle:
                self.idle.add(m.origin)
            else:
                self.idle.discard(m.origin)
        if self.expected is None:  # origins: the workers before (fewer after a resize)
            n = self.workers.known()
            origins = [i * FAN + j for i in range(self.fan) for j in range(n)]
            current = [self.marks[o] for o in origins if o in self.marks]
            if len(current) < len(origins):
                return None
            combined = min(current)
        else:  # origins: the source partitions; idle ones are not waited for
            if len(self.marks) < self.expected:
                return None
            live = [w for o, w in self.marks.items() if o not in self.idle]
            combined = min(live) if live else max(self.marks.values())
        if parking is not None:
            combined = parking.seen(self.to, combined)
        if self.out is not None and combined <= self.out:
            return None
        self.out = combined
        return Watermark(self.to, combined)

    def state(self) -> RelayState:
        return RelayState(self.to, self.marks, sorted(self.idle, key=str), self.out)


_seq = attrgetter("seq")


POLL = timedelta(milliseconds=5)  # how often a key with parked events looks at the watermark


class Parking:
    """Events that a keyed step's logic parks until the watermark passes them (`StepLogic.parked`:
    the index's labels that found no transaction yet, which may still come from another
    partition), per worker.

    A keyed step's keys cannot see its watermark, which its relay key on the same worker gets.
    So the relay notes here what it has seen (`seen`), and a key with parked events reads it (at
    its next batch, or polling every `POLL`) to apply those at or below it; until then the relay
    forwards no watermark at or past the smallest of them, so they still go out ahead of the
    watermark that covers them, in the canonical order downstream steps expect."""

    def __init__(self) -> None:
        self.marks: dict[int, int] = {}  # worker -> the largest watermark its relay has seen
        self.held: dict[int, dict[int, int]] = {}  # worker -> {id of a key: its smallest parked seq}
        self.sent: dict[int, int] = {}  # worker -> the largest watermark it may have sent

    def seen(self, worker: int, wm: int) -> int:
        """Note that `worker`'s relay has seen `wm`; what it may forward."""
        prev = self.marks.get(worker)
        if prev is None or wm > prev:
            self.marks[worker] = wm
        out = self._cap(worker, wm)
        if out > self.sent.get(worker, out - 1):
            self.sent[worker] = out
        return out

    def _cap(self, worker: int, wm: int) -> int:
        held = self.held.get(worker)
        if held:
            low = min(held.values())
            if low <= wm:
                return low - 1
        return wm

    def release(self, worker: int) -> int | None:
        """After a key of `worker` applied parked events: the watermark its relay may now send
        beyond what it sent (None: none), for the key to send after them on the relay's behalf
        (it speaks for the same origin, the worker; a watermark sent twice is harmless)."""
        wm = self.marks.get(worker)
        if wm is None:
            return None
        out = self._cap(worker, wm)
        sent = self.sent.get(worker)
        if sent is not None and out <= sent:
            return None
        self.sent[worker] = out
        return out

    def upto(self, worker: int) -> int | None:
        """The watermark `worker`'s relay has seen, if any."""
        return self.marks.get(worker)

    def hold(self, worker: int, key: int, low: int | None) -> None:
        """Key `key` on `worker` now parks events from `low` on (None: none)."""
        held = self.held.setdefault(worker, {})
        if low is None:
            held.pop(key, None)
        else:
            held[key] = low


class Held:
    """Events waiting for the watermark. Kept in a list and sorted (stable: arrival order breaks
    the rare tie) when some are released: events come in nearly sorted runs, which Python's sort
    merges in C, much cheaper than a heap operation per event."""

    def __init__(self, items: Iterable[Any] = ()) -> None:
        self.events: list[Any] = list(items)

    def release(self, upto: int | None) -> list[Any]:
        events = self.events
        if not events or upto is None:
            return []
        events.sort(key=_seq)
        cut = bisect_right(events, upto, key=_seq)
        if cut == len(events):
            self.events = []
            return events
        self.events = events[cut:]
        return events[:cut]

    def drain(self) -> list[Any]:
        events, self.events = self.events, []
        events.sort(key=_seq)
        return events

    def items(self) -> list[Any]:
        return sorted(self.events, key=_seq)

    def __len__(self) -> int:
        return len(self.events)


HeldState = tuple[list[Any], RelayState]


class OrderedBatch:
    """Hold events, release them in `seq` order up to the watermark; an event at or below what
    was already released goes out at once (counted as late)."""

    def __init__(self, step: str, relay: Relay, resume: HeldState | None) -> None:
        held, state = resume or ([], None)
        self.held = Held(held)
        self.relay = relay
        if state is not None:
            self.relay.to, self.relay.marks = state.to, dict(state.marks)
            self.relay.idle, self.relay.out = set(state.idle), state.out
        self.deadline = datetime.now(UTC) + MAX_HOLD
        self.gauge = ORDER_HELD.labels(step=step)
        self.gauge.inc(len(self.held))
        self.late = ORDER_LATE.labels(step=step)

    def take(self, items: list[Any]) -> tuple[list[Any], Watermark | None]:
        held = self.held.events
        before = len(held)
        marks: list[Watermark] = []
        out: list[Any] = []
        done = self.relay.out
        for it in items:
            if type(it) is Watermark:
                marks.append(it)
            elif done is not None and it.seq <= done:
                out.append(it)
            else:
                held.append(it)
        if out:
            self.late.inc(len(out))
        fwd = self.relay.update(marks) if marks else None
        if marks:
            self.deadline = datetime.now(UTC) + MAX_HOLD
        out.extend(self.held.release(self.relay.out))
        self.gauge.inc(len(self.held) - before)
        return out, fwd

    def drain(self) -> list[Any]:
        self.gauge.dec(len(self.held))
        return self.held.drain()

    def notify_at(self) -> datetime | None:
        return self.deadline if len(self.held) else None

    def overdue(self) -> list[Any]:
        """No watermark for `MAX_HOLD` (an upstream partition stalled, or the cluster was resized
        on resume): release what is held rather than keep it forever."""
        if datetime.now(UTC) < self.deadline:
            return []
        items = self.drain()
        if items:
            logger.warning("released %d events held %ss without a watermark", len(items), MAX_HOLD.seconds)
            self.relay.out = max(NEG if self.relay.out is None else self.relay.out, items[-1].seq)
        self.deadline = datetime.now(UTC) + MAX_HOLD
        return items

    def snapshot(self) -> HeldState:
        return (self.held.items(), self.relay.state())


# --- the ordered step ---------------------------------------------------------------------------


class StepLogic:
    """What a step of the flow does, apart from the ordering: plain state, no Bytewax.

    `ordered` hands `apply` each batch of a key's events in `seq` order (never a watermark) and
    sends on what it returns. A keyed step's key is dropped once `done()` (nothing left worth
    keeping); `wake_at()` asks to be woken at a wall-clock time, when `wake()` returns what to
    send and whether to drop the key. `snapshot()` is what `ordered` saves, and gives back to the
    step's builder on resume.

    A keyed step builds one per key. The steps that hold many keys (transactions, entities) keep
    them in a fixed set of shards (`flows.shards`), one logic per shard; the classes still
    declare `__slots__`: no instance dict per key.
    """

    __slots__ = ()

    def apply(self, events: list[Any]) -> list[Any]:
        raise NotImplementedError

    def snapshot(self) -> Any:
        raise NotImplementedError

    def done(self) -> bool:
        return False

    def ahead(self) -> None:
        """After each batch: a moment to do work ahead of the next `snapshot()` (a shard writes
        its changes so far: `flows.shards.ShardTable.ahead`)."""

    def wake_at(self) -> datetime | None:
        return None

    def wake(self) -> tuple[list[Any], bool]:
        return [], False

    def parked(self) -> Any | None:
        """The parked event with the smallest `seq` (None: none): one `apply` put aside until the
        step's watermark passes it (`Parking`)."""
        return None

    def unpark(self, upto: int | None) -> list[Any]:
        """Apply the parked events at or below `upto` (None: all of them, at the end of the
        input), in `seq` order; what to send on."""
        return []


@dataclass(frozen=True, slots=True)
class Stage:
    """What every key of one Bytewax step of an `ordered` step shares."""

    name: str
    build: Callable[[Any], StepLogic]
    workers: Workers
    expected: int | None  # origins of its watermarks: partitions, or None (the workers before)
    fan: int = 1  # inputs merged into it
    forward: bool = True  # send its watermark on (False: the last ordered step)
    key: Callable[[Any], str] | None = None  # a keyed step's key of an event
    parking: Parking | None = None  # a keyed step's parked events (`StepLogic.parked`)
    bundles: bool = False  # a batch's events go out as one list (`opened` after the step)
    clock: list[float] = field(default_factory=list)  # seconds its logic ran: `fraud_step_seconds`
    snap: list[float] = field(default_factory=list)  # seconds its snapshots took: `fraud_snapshot_seconds`

    def __post_init__(self) -> None:
        object.__setattr__(self, "clock", step_timer(self.name))
        object.__setattr__(self, "snap", snapshot_timer(self.name))

    def relay(self, state: RelayState | None = None) -> Relay:
        return Relay(self.expected, self.workers, state, self.fan)

    def worker_of(self, event: Any) -> int:
        """The worker that runs the key of `event`."""
        assert self.key is not None
        return self.workers.of(self.key(event))


class KeyedStep(msgspec.Struct, gc=False):
    """One key of a keyed step: a relay key, which forwards the step's watermark after the
    events it covers (its first item is a `Watermark`), or an event key running the step's logic.

    A `StatefulBatchLogic` by registration, not inheritance (Bytewax only checks `isinstance`):
    the abstract class gives every instance a dict. A struct without GC tracking: a step with a
    key per item (a Bytewax key per transaction, as the index once had) would otherwise make
    every full garbage collection walk them all.
    """

    stage: Stage
    relay: Relay | None = None
    logic: StepLogic | None = None
    worker: int = -1  # the worker this key runs on, once it has parked events

    @property
    def step_name(self) -> str:
        return self.stage.name

    @classmethod
    def build(cls, stage: Stage, resume: Any) -> KeyedStep:
        """The builder Bytewax calls with a key's snapshot (None for a new key)."""
        if type(resume) is RelayState:
            return cls(stage, stage.relay(resume))
        step = cls(stage, None, None if resume is None else stage.build(resume))
        if step.logic is not None and step.logic.parked() is not None:
            step._park()  # its relay holds its watermark back from the start
        return step

    @reported
    def on_batch(self, items: list[Any]) -> tuple[list[Any], bool]:
        items = unbundle(items)
        logic = self.logic
        if logic is None:
            if self.relay is not None or type(items[0]) is Watermark:
                if self.relay is None:
                    self.relay = self.stage.relay()
                fwd = self.relay.update(items, self.stage.parking)
                return ([fwd] if fwd is not None else []), StatefulBatchLogic.RETAIN
            logic = self.logic = self.stage.build(None)
        started = perf_counter()
        if len(items) > 1:  # Bytewax hands a key its batch in arrival order
            items.sort(key=_seq)
        out = logic.apply(items)
        if self.worker >= 0 or logic.parked() is not None:
            out += self._park()
        logic.ahead()
        self.stage.clock[0] += perf_counter() - started
        return bundled(out, self.stage.bundles), logic.done()

    def _park(self, end: bool = False) -> list[Any]:
        """Apply the parked events the watermark this worker's relay has seen passed (at the
        `end` of the input: all of them), and tell `Parking` what is still parked."""
        logic, parking = self.logic, self.stage.parking
        assert logic is not None and parking is not None, "only a keyed step's logic parks"
        first = logic.parked()
        if first is None:
            parking.hold(self.worker, id(self), None)
            return []
        if self.worker < 0:
            self.worker = self.stage.worker_of(first)
        upto = None if end else parking.upto(self.worker)
        out = logic.unpark(upto) if end or (upto is not None and first.seq <= upto) else []
        first = logic.parked()
        parking.hold(self.worker, id(self), None if first is None else first.seq)
        if out and not end:
            # What this key held back may now go out: the relay would forward it only with its
            # next watermark, which an input with nothing more to read never sends.
            mark = parking.release(self.worker)
            if mark is not None:
                out.append(Watermark(self.worker, mark))
        return out

    def notify_at(self) -> datetime | None:
        logic = self.logic
        if logic is None:
            return None
        wake = logic.wake_at()
        if self.worker >= 0 and logic.parked() is not None:
            poll = datetime.now(UTC) + POLL
            return poll if wake is None or poll < wake else wake
        return wake

    @reported
    def on_notify(self) -> tuple[list[Any], bool]:
        logic = self.logic
        assert logic is not None
        if self.worker < 0:
            return logic.wake()
        due = logic.wake_at()  # polled for its parked events: maybe before its own time
        out, done = logic.wake() if due is not None and due <= datetime.now(UTC) else ([], False)
        return out + self._park(), done

    @reported
    def on_eof(self) -> tuple[list[Any], bool]:
        if self.logic is not None and self.logic.parked() is not None:
            return self._park(end=True), StatefulBatchLogic.RETAIN  # nothing more can come
        return [], StatefulBatchLogic.RETAIN

    @reported
    def snapshot(self) -> Any:
        if self.relay is not None:
            return self.relay.state()
        assert self.logic is not None and not self.logic.done(), "a done key is dropped, never snapshotted"
        started = perf_counter()
        state = self.logic.snapshot()
        self.stage.snap[0] += perf_counter() - started
        return state


StatefulBatchLogic.register(KeyedStep)


class SequencerLogic(StatefulBatchLogic[Any, Any, HeldState]):
    """One bucket per worker in front of a keyed step: releases events in `seq` order, then
    the watermark that covers them."""

    def __init__(self, stage: Stage, resume: HeldState | None) -> None:
        self.batch = OrderedBatch(stage.name, stage.relay(), resume)
        self.bundles = stage.bundles
        self.step_name = f"{stage.name}_sequence"
        self.clock = step_timer(self.step_name)
        self.snap = snapshot_timer(self.step_name)

    @reported
    def on_batch(self, items: list[Any]) -> tuple[list[Any], bool]:
        started = perf_counter()
        out, fwd = self.batch.take(unbundle(items))
        if fwd is not None:
            out.append(fwd)
        self.clock[0] += perf_counter() - started
        return bundled(out, self.bundles), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self.batch.notify_at()

    @reported
    def on_notify(self) -> tuple[list[Any], bool]:
        return self.batch.overdue(), StatefulBatchLogic.RETAIN

    @reported
    def on_eof(self) -> tuple[list[Any], bool]:
        return self.batch.drain(), StatefulBatchLogic.RETAIN

    @reported
    def snapshot(self) -> HeldState:
        started = perf_counter()
        state = self.batch.snapshot()
        self.snap[0] += perf_counter() - started
        return state


WorkerState = tuple[Any, list[Any], RelayState]


class WorkerStep(StatefulBatchLogic[Any, Any, WorkerState]):
    """One bucket per worker that runs the step's logic itself, on the events it releases in
    `seq` order (the scorer: one replica of the models per worker)."""

    def __init__(self, stage: Stage, resume: WorkerState | None) -> None:
        state, held = (resume[0], (resume[1], resume[2])) if resume is not None else (None, None)
        self.logic = stage.build(state)
        self.batch = OrderedBatch(stage.name, stage.relay(), held)
        self.forward, self.clock, self.snap = stage.forward, stage.clock, stage.snap
        self.bundles = stage.bundles
        self.step_name = stage.name

    @reported
    def on_batch(self, items: list[Any]) -> tuple[list[Any], bool]:
        started = perf_counter()
        out, fwd = self.batch.take(unbundle(items))
        done = self.logic.apply(out) if out else []
        if fwd is not None and self.forward:
            done.append(fwd)
        self.clock[0] += perf_counter() - started
        return bundled(done, self.bundles), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self.batch.notify_at()

    @reported
    def on_notify(self) -> tuple[list[Any], bool]:
        items = self.batch.overdue()
        return (self.logic.apply(items) if items else []), StatefulBatchLogic.RETAIN

    @reported
    def on_eof(self) -> tuple[list[Any], bool]:
        items = self.batch.drain()
        return (self.logic.apply(items) if items else []), StatefulBatchLogic.RETAIN

    @reported
    def snapshot(self) -> WorkerState:
        started = perf_counter()
        held, relay = self.batch.snapshot()
        state = (self.logic.snapshot(), held, relay)
        self.snap[0] += perf_counter() - started
        return state


def _tag(i: int) -> Callable[[tuple[str, Any]], tuple[str, Any]]:
    """Mark the watermarks of a merged step's `i`-th input (their origins are worker indexes)."""

    def tag(kv: tuple[str, Any]) -> tuple[str, Any]:
        m = kv[1]
        if type(m) is Watermark:
            assert type(m.origin) is int, "a merged step's inputs come from ordered steps, not partitions"
            return kv[0], Watermark(i * FAN + m.origin, m.wm, m.to, m.idle)
        return kv

    return tag


@operator
def ordered(
    step_id: str,
    *ups: KeyedStream[Any],
    logic: Callable[[Any], StepLogic],
    workers: Workers,
    key: Callable[[Any], str],
    sequence: bool = False,
    per_worker: bool = False,
    everywhere: Callable[[Any], bool] | None = None,
    sources: int | None = None,
    last: bool = False,
) -> KeyedStream[Any]:
    """A step of the flow that applies its events in canonical (`seq`) order, on any cluster.

    `logic` builds a `StepLogic` from a snapshot (None for a new key); watermarks come in with
    the events of `ups` (merged if several) and go out after the events they cover, so the next
    `ordered` step can rely on them. `sources`: the first step after `stamp` combines the
    partitions' watermarks (their count); later ones the workers of the step(s) before.

    - keyed (default): one Bytewax key per `key(event)`, applying each batch in `seq` order.
      Enough where a key's events all come from one upstream key, in order, and for a logic
      that parks what may arrive ahead of the order until the watermark passes it
      (`StepLogic.parked`, `Parking`: the transaction index, whose labels may come from another
      partition than their transaction).
    - `sequence=True`: a bucket per worker first holds events until the watermark passes them
      and releases them in `seq` order, so keys that gather events from many places (a card's
      transactions come from every partition) see them in canonical order.
    - `per_worker=True`: the bucket runs `logic` itself on what it releases, one instance per
      worker: the events go to the bucket of `key(event)`, and those `everywhere` says so of to
      every bucket.

    `last`: no `ordered` step follows (`per_worker` only): the watermarks stop here.
    """
    fan = len(ups)
    name = step_id.rpartition(".")[2]  # the step's own name, without the flow's
    up = (
        ups[0]
        if fan == 1
        else op.merge("merge", *(op.map(f"tag_{i}", u, _tag(i)) for i, u in enumerate(ups)))
    )
    stage = Stage(name, logic, workers, sources, fan, not last, key, Parking(), bundles=True)
    if per_worker:
        routed = op.flat_map_batch("route", up, by_bucket(key, workers, everywhere))
        return op.flat_map_batch(
            "open", op.stateful_batch("apply", routed, partial(WorkerStep, stage)), opened
        )
    if sequence:
        buckets = op.flat_map_batch("bucket", up, by_bucket(key, workers))
        held = op.stateful_batch("sequence", buckets, partial(SequencerLogic, stage))
        up = op.flat_map_batch("open_sequence", held, opened)
        stage = Stage(name, logic, workers, None, key=key, parking=Parking(), bundles=True)
    routed = op.flat_map_batch("route", up, by_key(key, workers))
    keyed = cast(
        Callable[[Any], StatefulBatchLogic[Any, Any, Any]], partial(KeyedStep.build, stage)
    )  # registered
    return op.flat_map_batch("open", op.stateful_batch("apply", routed, keyed), opened)
