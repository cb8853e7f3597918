"""Per-transaction state that lives `FRAUD_LABEL_TTL_DAYS` of wall-clock time, without a Bytewax
timer per key.

Bytewax 0.21 scans every key's `notify_at` at every activation of a step, so a step with a timer
per transaction (the index, `pending`) gets slower with every transaction it holds. Instead, the
`stamp` step (`flows.ordering.stamp`) notes the ids of the transactions of each `bucket_s` of
arrival time in a key of its own (one key per bucket, no timer: `ExpiryBucket`), and its router,
which runs with every input batch, wakes the buckets whose time is up (`notes`): each sends an
`Expired` per id, routed like the transaction, and is dropped. After a restart the router wakes
every bucket of the `lookback` before the first due one (those whose wake-up the restart may have
missed); an older one would be kept forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec


class Expired(msgspec.Struct, frozen=True, gc=False):
    """`txn_id`'s time is up: the steps that hold state for it (index, pending) drop it. Outside
    the canonical order: its `seq` is below every event's (`flows.ordering.NEG`), and it only
    ever removes state."""

    txn_id: str
    seq: int = -(1 << 200)


@dataclass(frozen=True)
class Expiry:
    """How long per-transaction state lives, and which events start it."""

    ttl: timedelta
    id_of: Callable[[Any], str | None]  # the transaction id an event starts state for, or None
    bucket_s: int = 60
    lookback: timedelta = timedelta(days=7)
    clock: Callable[[], float] = time.time


BUCKET = "\U0010fffe"  # prefix of the buckets' keys in the stamp step
WAKE = "wake"  # the item a due bucket receives


def bucket_key(bucket: int) -> str:
    return f"{BUCKET}{bucket}"


def notes(expiry: Expiry) -> Callable[[list[Any]], list[tuple[str, Any]]]:
    """For each batch of events: the batch's new ids for the current bucket, and a `WAKE` for
    each bucket that came due since this worker's last call."""
    ttl_buckets = int(expiry.ttl.total_seconds()) // expiry.bucket_s + 1
    lookback = int(expiry.lookback.total_seconds()) // expiry.bucket_s
    woken: list[int] = []  # the last bucket this worker woke

    def note(batch: list[Any]) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        ids = [i for i in map(expiry.id_of, batch) if i is not None]
        now = int(expiry.clock()) // expiry.bucket_s
        if ids:
            out.append((bucket_key(now), msgspec.msgpack.encode(ids)))
        due = now - ttl_buckets
        start = woken[0] if woken else due - lookback
        if due > start:
            out += [(bucket_key(b), WAKE) for b in range(start + 1, due + 1)]
            woken[:] = [due]
        return out

    return note


class ExpiryBucket:
    """The ids that arrived in one bucket of time, as the batches brought them (msgpack-encoded
    lists: a snapshot is a few bytes objects, whatever the bucket holds)."""

    def __init__(self, resume: tuple[bytes, ...] | None) -> None:
        self.chunks: list[bytes] = list(resume or ())

    def on_batch(self, items: list[Any]) -> tuple[list[Any], bool]:
        if WAKE not in items:
            self.chunks += items
            return [], False
        out = [Expired(i) for chunk in self.chunks for i in msgspec.msgpack.decode(chunk)]
        self.chunks = []
        return out, True

    def snapshot(self) -> tuple[bytes, ...]:
        return tuple(self.chunks)
