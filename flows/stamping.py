"""Where the canonical order comes from: each event's `seq`, and its partition's watermarks.

- `seq` = (running maximum of the partition's event times, partition code, position). It grows
  along each partition, whatever the events' own times, and depends only on what the partition
  holds, so it is the same in every run and after a resume.
- After each batch a partition sends a `Watermark`: "nothing I send from now on is at or below
  this seq". `flows.ordering` carries them through every step.
"""

from __future__ import annotations

import time
from functools import partial
from time import perf_counter
from typing import Any
from zlib import crc32

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Stream, operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from features.events import Label, Transaction
from flows.batch import opened
from flows.reporting import reported
from service.telemetry import snapshot_timer

INF = 1 << 200  # a watermark past every seq: the end of the input
NEG = -(1 << 200)  # before every seq: a partition that has sent nothing yet
POSITION_BITS = 40
CODE_BITS = 24
FUTURE_TOLERANCE_MS = 3_600_000  # a clock error cannot drag a partition's order past now + 1h


class Watermark(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """Nothing `origin` sends after this has a `seq` at or below `wm`; `to`: the receiving key's
    worker index (how a relay learns its own index); `idle`: the partition has nothing to read."""

    origin: str | int
    wm: int
    to: int = -1
    idle: bool = False


TICK = "tick"  # the record kind of a `Tick`: `(TICK, "", "<stream>#")`


class Tick(msgspec.Struct, frozen=True, gc=False):
    """A source partition saying it found nothing to read for a while."""

    partition: str


def partition_of(origin: str) -> str:
    """The partition an event was read from: `<stream>` of `<stream>#<id>`; files are one."""
    return origin.rpartition("#")[0]


def arrival_ns(origin: str, now_ns: int) -> int:
    """When a record arrived, for its arrival-to-decision latency: a Redis stream entry's id time
    (`<stream>#<ms>-<n>`: Redis's clock when the producer's XADD added it, to the millisecond,
    rounded down), so the time it waited in the stream counts (an epoch close holding the input,
    the source's linger and polls, a backlog); `now_ns` for anything else (files, ticks). Never after
    `now_ns`: a Redis clock ahead of this machine's reads as no wait, not a negative one."""
    _, sep, entry_id = origin.rpartition("#")
    ms, dash, _ = entry_id.partition("-")
    if sep and dash and ms.isdigit():
        return min(int(ms) * 1_000_000, now_ns)
    return now_ns


def partition_code(partition: str) -> int:
    return crc32(partition.encode()) & ((1 << CODE_BITS) - 1)


def make_seq(running_max_ms: int, code: int, position: int) -> int:
    return (running_max_ms << (CODE_BITS + POSITION_BITS)) + (code << POSITION_BITS) + position


# --- stamping -----------------------------------------------------------------------------------


def stamp_key(event: Transaction | Label | Tick) -> tuple[str, Transaction | Label | Tick]:
    if type(event) is Tick:
        return event.partition, event
    return partition_of(event.origin), event  # type: ignore[union-attr]


StampState = tuple[str | None, int, int, bool]


class StampLogic(StatefulBatchLogic[Any, Any, StampState]):
    """Keyed by source partition: gives each event its `seq`, then sends the partition's watermark.

    The snapshot (partition, running maximum, position, idle) resumes the numbering exactly where
    the partition's own snapshot resumes reading.
    """

    step_name = "stamp"

    def __init__(self, resume: StampState | None, bundles: bool = False) -> None:
        self.bundles = bundles  # the batch's events go out as one list (`flows.ordering.opened`)
        self.partition, self.running_max, self.position, self.idle = resume or (None, NEG, 0, False)
        self.wm = NEG
        if self.partition is not None and self.position:
            self.wm = make_seq(self.running_max, partition_code(self.partition), self.position)

    @reported
    def on_batch(self, items: list[Any]) -> tuple[list[Any], bool]:
        if self.partition is None:
            first = items[0]
            self.partition = first.partition if type(first) is Tick else partition_of(first.origin)
        code = partition_code(self.partition)
        cap = int(time.time() * 1000) + FUTURE_TOLERANCE_MS
        replace = msgspec.structs.replace
        out: list[Any] = []
        ticked = False
        for e in items:
            if type(e) is Tick:
                ticked = True
                continue
            ts = e.ts_ms if e.ts_ms < cap else cap
            if ts > self.running_max:
                self.running_max = ts
            self.position += 1
            self.wm = make_seq(self.running_max, code, self.position)
            out.append(replace(e, seq=self.wm))
        if out:
            self.idle = False
            out.append(Watermark(self.partition, self.wm))
        elif ticked and not self.idle:
            self.idle = True
            out.append(Watermark(self.partition, self.wm, idle=True))
        return ([out] if self.bundles and out else out), StatefulBatchLogic.RETAIN

    @reported
    def on_eof(self) -> tuple[list[Any], bool]:
        return (
            [Watermark(self.partition, INF)] if self.partition is not None else []
        ), StatefulBatchLogic.RETAIN

    @reported
    def snapshot(self) -> StampState:
        started = perf_counter()
        state = (self.partition, self.running_max, self.position, self.idle)
        _SNAP[0] += perf_counter() - started
        return state


# --- the stamp step ---------------------------------------------------------------------------


def stamp_router(batch: list[Any]) -> list[tuple[str, Any]]:
    """Key each event by its partition (for `op.flat_map_batch`: one call per batch)."""
    return [stamp_key(e) for e in batch]


_SNAP = snapshot_timer("stamp")


@operator
def stamp(step_id: str, up: Stream[Any]) -> KeyedStream[Any]:
    """Give each event its `seq`, per source partition (`StampLogic`), followed by the partition's
    watermarks: the keyed stream every `ordered` step reads."""
    stamped = op.stateful_batch(
        "stamp", op.flat_map_batch("key_partition", up, stamp_router), partial(StampLogic, bundles=True)
    )
    return op.flat_map_batch("open", stamped, opened)
