"""The canonical event order (`flows.ordering`): routing, stamping, relaying, sequencing.

The end-to-end claim (a 2-process cluster decides exactly as one process) is tested with real
processes in `tests/test_production.py`; these tests pin down the parts it rests on.
"""

from __future__ import annotations

import math
import pickle
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.testing import TestingSink, TestingSource, cluster_main
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from features.engine import FeatureRow
from features.events import Transaction
from flows.batch import opened
from flows.ordering import (
    FAN,
    Bundle,
    KeyedStep,
    Parking,
    Relay,
    SequencerLogic,
    Stage,
    StepLogic,
    WorkerStep,
    broadcast,
    by_bucket,
    by_key,
    unbundle,
)
from flows.routing import Shards, Workers, worker_of
from flows.stamping import INF, NEG, StampLogic, Tick, Watermark, make_seq, partition_code


class _Where(StatefulBatchLogic[str, tuple[str, int], None]):
    def __init__(self, resume: None) -> None:
        pass

    def on_batch(self, items: list[str]) -> tuple[list[tuple[str, int]], bool]:
        return [(k, threading.get_ident()) for k in items], True

    def snapshot(self) -> None:
        return None


@pytest.mark.parametrize("count", [2, 3, 4])
def test_watermark_keys_land_on_the_worker_predicted_for_them(count: int) -> None:
    """`worker_of` reproduces Bytewax's routing, so `worker_keys()[j]` reaches worker j."""
    worker_keys = Workers(count).worker_keys()
    keys = [*worker_keys, *(f"card-{i}" for i in range(40)), "~t1", "\U0010ffff7"]
    seen: list[tuple[str, tuple[str, int]]] = []
    flow = Dataflow("where")
    stream = op.key_on("key", op.input("in", flow, TestingSource(keys)), lambda k: k)
    op.output("out", op.stateful_batch("where", stream, _Where), TestingSink(seen))
    cluster_main(flow, [], 0, worker_count_per_proc=count)
    thread_of = {key: thread for _, (key, thread) in seen}
    assert len(thread_of) == len(keys)
    predicted: dict[int, set[int]] = {}
    for key, thread in thread_of.items():
        predicted.setdefault(thread, set()).add(worker_of(key, count))
    assert sorted(len(w) for w in predicted.values()) == [1] * count  # one worker index per thread
    assert len({thread_of[k] for k in worker_keys}) == count  # each watermark key on its own worker
    assert all(k > "~zzzz" and k > "card-zzz" for k in worker_keys)  # applied after entity keys


def txn(i: int, ts: int, origin: str = "in:{0}#1-0") -> Transaction:
    return Transaction(f"t{i}", ts, "c1", "m1", 1.0, origin=origin)


def test_stamp_numbers_along_the_partition_whatever_the_event_times() -> None:
    stamp = StampLogic(None)
    out, keep = stamp.on_batch([txn(1, 5_000), txn(2, 3_000), txn(3, 9_000)])
    events, mark = out[:-1], out[-1]
    code = partition_code("in:{0}")
    # An event earlier than one before it keeps its place: the running maximum, then position.
    assert [e.seq for e in events] == [
        make_seq(5_000, code, 1),
        make_seq(5_000, code, 2),
        make_seq(9_000, code, 3),
    ]
    assert mark == Watermark("in:{0}", events[-1].seq) and keep is False
    resumed = StampLogic(stamp.snapshot())
    (again, _), _ = resumed.on_batch([txn(4, 1_000)])
    assert again.seq == make_seq(9_000, code, 4)  # a resume numbers on exactly where it stopped
    # Idle: said once per quiet spell, and no longer once events come again.
    assert resumed.on_batch([Tick("in:{0}")])[0] == [Watermark("in:{0}", again.seq, idle=True)]
    assert resumed.on_batch([Tick("in:{0}")])[0] == []
    assert resumed.on_batch([txn(5, 10_000)])[0][-1].idle is False
    assert resumed.on_eof()[0] == [Watermark("in:{0}", INF)]


def test_a_step_s_batch_goes_out_as_one_list_and_comes_back_as_its_events() -> None:
    """Inside the flow, stamping and every `ordered` step hand Bytewax a batch's events as one
    list (Bytewax then builds one `(key, value)` item, not one per event) and `opened` turns it
    back into one `(key, event)` item per event, in order, the key shared; a value that is not a
    list (a relay's watermark, an event from a timer) passes as it is."""
    plain, bundled = StampLogic(None), StampLogic(None, bundles=True)
    batch = [txn(1, 5_000), txn(2, 3_000), txn(3, 9_000)]
    events, _ = plain.on_batch(list(batch))
    out, keep = bundled.on_batch(list(batch))
    assert out == [events] and keep is False
    assert bundled.on_batch([Tick("in:{0}")])[0] == [[Watermark("in:{0}", events[-1].wm, idle=True)]]
    assert bundled.on_batch([Tick("in:{0}")])[0] == []  # nothing to say: no list at all
    items = opened([("in:{0}", out[0]), ("relay", Watermark(0, 7)), ("in:{0}", [])])
    assert items == [*(("in:{0}", e) for e in events), ("relay", Watermark(0, 7))]
    assert len({id(k) for k, _ in items[:-1]}) == 1

    stage = Stage("bundle_test", _Echo, Workers(1), None, bundles=True)
    key = KeyedStep.build(stage, None)
    (together,), done = key.on_batch([Item(3), Item(1)])
    assert [e.seq for e in together] == [1, 3] and done is False  # one list, in seq order
    assert key.on_batch([Item(4)])[0][0][0].seq == 4


class _Echo(StepLogic):
    def __init__(self, resume: Any) -> None:
        pass

    def apply(self, events: list[Any]) -> list[Any]:
        return events


def test_stamp_caps_a_timestamp_far_in_the_future() -> None:
    """A clock error must not push a partition's order (and so everyone's waiting) out of reach."""
    stamp = StampLogic(None)
    (e, _), _ = stamp.on_batch([txn(1, 10**15)])
    assert e.seq < make_seq(10**13, 0, 0)


def test_relay_waits_for_every_origin_and_only_moves_forward() -> None:
    workers = Workers(2)
    relay = Relay(None, workers)
    assert relay.update([Watermark(0, 10, 1)]) is None  # worker 1 has not spoken yet
    assert relay.update([Watermark(1, 7, 1)]) == Watermark(1, 7)
    assert relay.update([Watermark(1, 5, 1)]) is None  # late and smaller: no step back
    assert relay.update([Watermark(1, 20, 1)]) == Watermark(1, 10)
    restored = Relay(None, workers, relay.state())
    assert restored.update([Watermark(0, 30, 1)]) == Watermark(1, 20)


def test_relay_of_a_merged_step_waits_for_every_worker_of_every_input() -> None:
    """`pending` reads the entity chain and the labels that skip it: its watermark is the
    minimum over both inputs' workers (origins tagged `input * FAN + worker`)."""
    relay = Relay(None, Workers(2), fan=2)
    assert relay.update([Watermark(0, 10, 0), Watermark(1, 12, 0)]) is None  # input 1 has not spoken
    assert relay.update([Watermark(FAN, 4, 0)]) is None  # nor has its worker 1
    assert relay.update([Watermark(FAN + 1, 30, 0)]) == Watermark(0, 4)
    assert relay.update([Watermark(FAN, 40, 0)]) == Watermark(0, 10)


def test_partition_relay_skips_idle_partitions_until_they_speak_again() -> None:
    relay = Relay(2, Workers(1))
    assert relay.update([Watermark("a", 10, 0)]) is None
    assert relay.update([Watermark("b", 3, 0, idle=True)]) == Watermark(0, 10)  # b is not waited for
    assert relay.update([Watermark("b", 12, 0), Watermark("a", 15, 0)]) == Watermark(0, 12)
    assert relay.update([Watermark("a", 16, 0, idle=True), Watermark("b", 14, 0, idle=True)]) == Watermark(
        0, 16
    )


class Item:
    def __init__(self, seq: int) -> None:
        self.seq = seq

    def __repr__(self) -> str:
        return f"Item({self.seq})"


class Parks(StepLogic):
    """A step logic that parks every event until the watermark passes it."""

    def __init__(self, resume: list[Item] | None) -> None:
        self.held: list[Item] = list(resume or [])

    def apply(self, events: list[Any]) -> list[Any]:
        self.held += events
        return []

    def parked(self) -> Item | None:
        return min(self.held, key=lambda e: e.seq) if self.held else None

    def unpark(self, upto: int | None) -> list[Any]:
        ready = sorted((e for e in self.held if upto is None or e.seq <= upto), key=lambda e: e.seq)
        self.held = [e for e in self.held if e not in ready]
        return ready

    def snapshot(self) -> list[Item]:
        return list(self.held)


def test_a_keyed_step_holds_its_watermark_behind_a_parked_event_and_sends_it_after_it() -> None:
    """A key that parks an event (the index's label before its transaction) cannot see the
    watermark; its worker's relay key can. The relay forwards no watermark at or past a parked
    event; the key, polling, applies it once the relay has seen the watermark pass it and sends
    the watermark the relay held back after it (an input with nothing more to read sends no new
    watermark for the relay to forward it with). A resumed key parks again from its build on."""
    stage = Stage("park_test", Parks, Workers(1), 2, key=lambda e: "k", parking=Parking())
    key, relay = KeyedStep.build(stage, None), KeyedStep.build(stage, None)
    assert key.on_batch([Item(5)]) == ([], False)
    assert key.notify_at() is not None  # it polls for the watermark
    assert relay.on_batch([Watermark("a", 10, 0), Watermark("b", 8, 0)]) == ([Watermark(0, 4)], False)
    out, _ = key.on_notify()
    assert [getattr(o, "seq", o) for o in out] == [5, Watermark(0, 8)]  # the event, then the watermark
    assert key.notify_at() is None  # nothing parked: no more polling
    assert relay.on_batch([Watermark("a", 12, 0), Watermark("b", 12, 0)]) == ([Watermark(0, 12)], False)
    assert key.on_batch([Item(20)]) == ([], False)
    saved = key.logic.snapshot()  # type: ignore[union-attr]
    assert [o.seq for o in key.on_eof()[0]] == [20]  # the end of the input: all of them
    KeyedStep.build(stage, saved)  # a restart from that snapshot: parked from the start
    assert relay.on_batch([Watermark("a", 30, 0), Watermark("b", 30, 0)]) == ([Watermark(0, 19)], False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 1_000), max_size=12, unique=True), min_size=2, max_size=2),
    st.randoms(use_true_random=False),
)
def test_sequencer_releases_everything_once_in_order_whatever_the_interleaving(
    streams: list[list[int]], rnd: Any
) -> None:
    """Two upstream workers, each sending ascending events then its watermark; any interleaving
    of the two, cut into any batches, and snapshots in between: the output is the events in `seq`
    order, each once, and never an event after a watermark that covers it."""
    stage = Stage("test_order", lambda _: None, Workers(2), None)  # type: ignore[arg-type, return-value]
    queues: list[list[Any]] = []
    for origin, seqs in enumerate(streams):
        q: list[Any] = []
        for s in sorted(2 * s + origin for s in seqs):  # seqs are unique, across partitions too
            q.append(Item(s))
            if rnd.random() < 0.4:
                q.append(Watermark(origin, s, 0))
        q.append(Watermark(origin, INF, 0))
        queues.append(q)
    logic = SequencerLogic(stage, None)
    out: list[Any] = []
    while any(queues):
        batch = []
        for _ in range(rnd.randint(1, 4)):
            live = [q for q in queues if q]
            if live:
                batch.append(rnd.choice(live).pop(0))
        out += logic.on_batch(batch)[0]
        if rnd.random() < 0.3:
            logic = SequencerLogic(stage, logic.snapshot())
    events = [e.seq for e in out if isinstance(e, Item)]
    assert events == sorted(2 * s + origin for origin, seqs in enumerate(streams) for s in seqs)
    released = NEG
    for e in out:  # a forwarded watermark covers only what went out before it
        if isinstance(e, Watermark):
            released = e.wm
        else:
            assert e.seq > released
    assert out[-1] == Watermark(0, INF)


def test_sequencer_hands_on_an_event_behind_the_watermark_at_once() -> None:
    """Only after an idle partition speaks again: applied now, out of order, never held or lost."""
    logic = SequencerLogic(Stage("late_test", lambda _: None, Workers(1), None), None)  # type: ignore[arg-type, return-value]
    first = logic.on_batch([Item(5), Watermark(0, 9, 0)])[0]
    assert [getattr(e, "seq", e) for e in first] == [5, Watermark(0, 9)]
    late = REGISTRY.get_sample_value("fraud_order_late_events_total", {"step": "late_test"})
    assert late in (None, 0.0)
    assert [e.seq for e in logic.on_batch([Item(3)])[0]] == [3]
    assert REGISTRY.get_sample_value("fraud_order_late_events_total", {"step": "late_test"}) == 1.0
    assert logic.on_batch([Item(12)])[0] == [] and [e.seq for e in logic.on_eof()[0]] == [12]


def test_bucket_routing_sends_a_key_to_one_bucket_and_a_watermark_to_all() -> None:
    workers = Workers(3)
    route = by_bucket(lambda item: item.card_id, workers)
    buckets = {key for key, _ in route([("", txn(i, i)) for i in range(20)])}
    assert len(buckets) == 1 and buckets <= set(workers.worker_keys())
    marks = route([("", Watermark(2, 7))])
    assert marks == [(k, Watermark(2, 7, j)) for j, k in enumerate(workers.worker_keys())]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8])
def test_a_keys_bucket_is_on_the_worker_that_runs_the_key(count: int) -> None:
    """What a bucket releases goes to keys Bytewax runs on the bucket's own worker: a sequenced
    step (and the scorer after `pending`) moves no event between processes for that hop."""
    workers = Workers(count)
    route = by_bucket(lambda item: Shards().of(item.card_id), workers)
    events = [Transaction(f"t{i}", i, f"c{i}", "m1", 1.0, seq=i) for i in range(300)]
    routed = route([("", e) for e in events])
    assert sum(len(b) for _, b in routed) == len(events)
    for bucket, bundle in routed:
        assert {worker_of(Shards().of(e.card_id), count) for e in bundle} == {worker_of(bucket, count)}
    assert len(routed) == count  # every worker gets some
    assert workers.placed == {k: worker_of(k, count) for k in workers.placed}
    workers.set(count + 1)  # a cluster of another size places every key anew
    assert workers.placed == {}


def test_routers_bundle_a_batch_per_key_in_arrival_order_with_watermarks_after() -> None:
    """One item per destination key and batch (Bytewax pays per item), the events in the order
    they came, and every watermark after the events: late is still true, early would not be."""
    workers = Workers(2)
    events = [Transaction(f"t{i}", i, f"c{i % 3}", "m1", 1.0, seq=i) for i in range(6)]
    batch = [("", events[0]), ("", Watermark(0, 0)), *(("", e) for e in events[1:])]
    routed = by_key(lambda item: item.card_id, workers)(batch)
    *bundles, m0, m1 = routed
    assert (m0, m1) == tuple(broadcast(Watermark(0, 0), workers))
    assert all(type(b) is Bundle for _, b in bundles)
    assert {k: [e.seq for e in b] for k, b in bundles} == {
        k: [e.seq for e in events if e.card_id == k] for k in {e.card_id for e in events}
    }
    assert unbundle([b for _, b in bundles] + [m0[1]]) == [e for _, b in bundles for e in b] + [m0[1]]
    everywhere = by_bucket(lambda item: item.card_id, workers, lambda item: item.seq == 2)(batch)
    opened = {k: [getattr(e, "seq", e) for e in unbundle([b])] for k, b in everywhere[:-2]}
    assert all(2 in seqs for seqs in opened.values()) and len(opened) == 2  # in every bucket
    assert sorted(x for seqs in opened.values() for x in seqs if x != 2) == [0, 1, 3, 4, 5]
    assert unbundle([Watermark(0, 1)]) == [Watermark(0, 1)]


def test_a_bundle_for_another_process_is_pickled_once_and_arrives_as_its_events() -> None:
    """Bytewax pickles an item for another process twice (to size the message, then to write
    it): a bundle's events are encoded the first time only, and come out as a plain list."""
    reduced: list[int] = []

    class Counted(FeatureRow):
        def __reduce__(self) -> Any:
            reduced.append(self.txn.seq)
            return FeatureRow, (self.txn, self.keys, self.parts, self.late)

    seq = make_seq(1_767_225_600_000, partition_code("txn:0"), 7)  # a real seq: ~105 bits
    txns = [Transaction(f"t{i}", i, "c1", "m1", 1.0, seq=seq + i, raw='{"x": 1}') for i in range(3)]
    rows = [Counted(t, ("card:c1", None), [[1.0, float("nan")]], i == 2) for i, t in enumerate(txns)]
    (key, bundle), *_ = by_key(lambda row: row.txn.card_id, Workers(2))([("", r) for r in rows])
    sized, sent = pickle.dumps((key, bundle)), pickle.dumps((key, bundle))
    assert sized == sent and reduced == [seq, seq + 1, seq + 2]
    got_key, got = pickle.loads(sent)
    assert got_key == key and type(got) is list and len(got) == 3
    assert [(type(r), r.txn, r.keys, r.late) for r in got] == [
        (FeatureRow, r.txn, r.keys, r.late) for r in rows
    ]
    assert all(math.isnan(r.parts[0][1]) and r.parts[0][0] == 1.0 for r in got)
    assert unbundle([got, Watermark(0, 1)]) == [*got, Watermark(0, 1)]


def test_sequencer_releases_what_it_held_once_no_watermark_came_for_too_long() -> None:
    """A stalled upstream (or a resize on resume) must not keep events forever."""
    logic = SequencerLogic(Stage("stall_test", lambda _: None, Workers(2), None), None)  # type: ignore[arg-type, return-value]
    assert logic.on_batch([Item(7), Item(4), Watermark(0, 9, 0)])[0] == []  # worker 1 never speaks
    deadline = logic.notify_at()
    assert deadline is not None and logic.on_notify()[0] == []  # not yet
    logic.batch.deadline = datetime.now(UTC) - timedelta(seconds=1)
    assert [e.seq for e in logic.on_notify()[0]] == [4, 7]
    assert logic.notify_at() is None  # nothing held: nothing to wake up for


class _Broken(StepLogic):
    def apply(self, events: list[Any]) -> list[Any]:
        if any(e.seq == 13 for e in events):
            raise KeyError("a bug, not a bad record")
        return events

    def snapshot(self) -> Any:
        raise OverflowError("can't serialize ints < -2**63 or > 2**64 - 1")


def test_a_step_that_raises_says_so_before_the_flow_stops(caplog: pytest.LogCaptureFixture) -> None:
    """In a cluster Bytewax reports such an exception only as its network threads' panic: the
    step logs it first, with its name, when it happened and the traceback (keyed steps,
    sequencers, per-worker steps and `stamp` alike), and re-raises it."""
    keyed = KeyedStep.build(Stage("keyed_bug", lambda _: _Broken(), Workers(1), None), None)
    keyed.on_batch([Item(1)])
    worker = WorkerStep(Stage("worker_bug", lambda _: _Broken(), Workers(1), None), None)
    sequencer = SequencerLogic(Stage("seq_bug", lambda _: None, Workers(1), None), None)  # type: ignore[arg-type, return-value]
    sequencer.batch = None  # type: ignore[assignment]  # a bug in the ordering itself
    cases = [
        (keyed.snapshot, "keyed_bug", "saving its state at an epoch close", OverflowError),
        (worker.snapshot, "worker_bug", "saving its state at an epoch close", OverflowError),
        (lambda: keyed.on_batch([Item(13)]), "keyed_bug", "on a batch", KeyError),
        (lambda: worker.on_batch([Item(13), Watermark(0, 13, 0)]), "worker_bug", "on a batch", KeyError),
        (lambda: sequencer.on_batch([Item(1)]), "seq_bug_sequence", "on a batch", AttributeError),
        (lambda: StampLogic(None).on_batch([Item(1)]), "stamp", "on a batch", AttributeError),  # no origin
    ]
    for call, name, when, error in cases:
        caplog.clear()
        with caplog.at_level("CRITICAL", logger="flows.reporting"), pytest.raises(error):
            call()
        (record,) = caplog.records
        assert record.getMessage() == f"step {name!r} failed {when}: the flow stops"
        assert record.exc_info is not None and record.exc_info[0] is error
    caplog.clear()
    with caplog.at_level("CRITICAL", logger="flows.reporting"):
        assert [e.seq for e in keyed.on_batch([Item(2)])[0]] == [2]
    assert caplog.records == []  # nothing logged when nothing raises
