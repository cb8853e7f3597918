"""Per-transaction state that lives `FRAUD_LABEL_TTL_DAYS` of wall-clock time, without a Bytewax
key or timer per transaction.

Each index shard (`flows.steps.IndexLogic`) notes, in memory, the ids that arrived in each
bucket of wall-clock time (`Arrivals`; an entry's bucket is also in its `TxnEntry`, so a resumed
shard rebuilds them from its entries, and nothing more is saved). When a bucket's time is up, at
the shard's next batch or at its one timer (`wake_at`, for a shard that gets none), the shard
drops the bucket's entries and sends an `Expired` per id on to `pending`, routed like the
transaction. Bytewax's recovery store holds a row per key it ever saved and scans them all at
every epoch close, so the expiry must not add keys that grow with the TTL: a key per minute of
arrivals (86,400 for 60 days) would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import msgspec

MIN_BUCKET_S = 60
BUCKETS_PER_TTL = 1440  # an entry lives at most 1/1440 of its TTL longer (a minute a day)


class Expired(msgspec.Struct, frozen=True, gc=False):
    """`txn_id`'s time is up: the steps that hold state for it (index, pending) drop it. Outside
    the canonical order: its `seq` is below every event's (`flows.ordering.NEG`), and it only
    ever removes state."""

    txn_id: str
    seq: int = -(1 << 200)


@dataclass(frozen=True)
class Expiry:
    """How long per-transaction state lives, and the clock it is measured with."""

    ttl: timedelta
    bucket_s: int = 0  # 0: the TTL / BUCKETS_PER_TTL, at least MIN_BUCKET_S
    clock: Callable[[], float] = time.time

    @property
    def seconds(self) -> int:
        """The bucket's length in seconds."""
        if self.bucket_s:
            return self.bucket_s
        return max(MIN_BUCKET_S, int(self.ttl.total_seconds()) // BUCKETS_PER_TTL)

    @property
    def buckets(self) -> int:
        """Buckets a bucket waits after its own before its entries expire."""
        return int(self.ttl.total_seconds()) // self.seconds + 1

    def bucket(self) -> int:
        """The bucket of now."""
        return int(self.clock()) // self.seconds


class Arrivals:
    """The ids that arrived in each bucket, oldest bucket first: per bucket one bytearray of
    length-prefixed UTF-8 ids (a dozen bytes per id, no object per id)."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: dict[int, bytearray] = {}

    def add(self, bucket: int, txn_id: str) -> None:
        b = txn_id.encode()
        buf = self.buckets.get(bucket)
        if buf is None:
            buf = self.buckets[bucket] = bytearray()
        buf += len(b).to_bytes(2, "little")
        buf += b

    def oldest(self) -> int | None:
        return next(iter(self.buckets), None)

    def due(self, last: int) -> Iterator[tuple[int, str]]:
        """Remove the buckets up to `last` (oldest first); each one's (bucket, id)s."""
        for bucket in sorted(b for b in self.buckets if b <= last):
            buf = self.buckets.pop(bucket)
            at = 0
            while at < len(buf):
                n = int.from_bytes(buf[at : at + 2], "little")
                yield bucket, buf[at + 2 : at + 2 + n].decode()
                at += 2 + n

    def sort(self) -> None:
        """Oldest bucket first again (after a rebuild in any order)."""
        self.buckets = dict(sorted(self.buckets.items()))

    def __len__(self) -> int:
        return len(self.buckets)
