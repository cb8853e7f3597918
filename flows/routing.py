"""Which worker a key lands on, so that a watermark can reach every worker of a keyed step.

Bytewax 0.21 routes a key to worker `hash(key) % worker_count`, with Rust's `DefaultHasher`
(SipHash-1-3, zero key) over the string's bytes and a 0xFF terminator. `worker_of` computes the
same in Python; `Workers.worker_keys()` are one key per worker, and so are a `Shards`' keys for its
count (the keyed steps' state shards, `flows.shards`), so that every worker count dividing it gets
the same number of shards. The worker count comes from
`WorkerCount`, an input Bytewax builds on every worker before any item flows. `tests/test_ordering.py` checks
the prediction against real workers, so a Bytewax upgrade that changes the hash fails there.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any
from zlib import crc32

from bytewax.inputs import DynamicSource, StatelessSourcePartition

MARK = "\U0010ffff"  # prefix of the watermark keys: sorts after any entity key

_M64 = (1 << 64) - 1
PLACED = 4096  # keys whose worker `Workers.of` remembers


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def siphash13(data: bytes) -> int:
    """SipHash-1-3 with a zero key: Rust's `DefaultHasher`, which Bytewax routes keys with."""
    v0, v1, v2, v3 = 0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573

    def rounds(n: int) -> None:
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & _M64
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & _M64
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & _M64
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & _M64
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)

    n = len(data)
    end = n - n % 8
    for i in range(0, end, 8):
        m = int.from_bytes(data[i : i + 8], "little")
        v3 ^= m
        rounds(1)
        v0 ^= m
    m = int.from_bytes(data[end:], "little") | ((n & 0xFF) << 56)
    v3 ^= m
    rounds(1)
    v0 ^= m
    v2 ^= 0xFF
    rounds(3)
    return v0 ^ v1 ^ v2 ^ v3


def worker_of(key: str, workers: int) -> int:
    """The worker Bytewax 0.21 routes `key` to: hash of the `str` (its bytes, then 0xFF) mod count."""
    return siphash13(key.encode() + b"\xff") % workers


@functools.cache  # every shard table of a step asks for the same keys
def one_per_worker(prefix: str, count: int) -> tuple[str, ...]:
    """One key per worker of `count`, in worker order (the `j`th lands on worker `j`): the first
    `<prefix><n>` to land on each. Over a divisor of `count`, the `j`th lands on `j % divisor`."""
    found: dict[int, str] = {}
    for n in itertools.count():
        key = f"{prefix}{n}"
        found.setdefault(worker_of(key, count), key)
        if len(found) == count:
            return tuple(found[i] for i in range(count))
    raise AssertionError("unreachable")


DEFAULT_SHARDS = 16  # FRAUD_STATE_SHARDS: even over 1, 2, 4, 8 and 16 workers


class Shards:
    """The fixed set of shards a keyed step keeps its entries in (`flows.shards`,
    `FRAUD_STATE_SHARDS`): the Bytewax keys, one per worker of `count` workers (so every worker
    count dividing `count` gets the same number each), and the shard of an id. Fixed for a recovery
    store's life: a resume on another count would find entries in shards their ids no longer name."""

    __slots__ = ("count", "keys")

    def __init__(self, count: int = DEFAULT_SHARDS) -> None:
        if count < 1:
            raise ValueError(f"a keyed step needs at least one shard, not {count}")
        self.count, self.keys = count, one_per_worker("shard", count)

    def of(self, key: str) -> str:
        """The shard key of a transaction id or entity key (the same in every run and on every
        cluster layout)."""
        return self.keys[crc32(key.encode()) % self.count]

    def __repr__(self) -> str:
        return f"Shards({self.count})"


class Workers:
    """The worker count of the cluster a flow runs on, and one key per worker.

    A flow gets its own (`flows.fraud.build`); the `WorkerCount` input fills it in on every worker
    before any item flows, and the routers and relays of `flows.ordering` read it from there.
    """

    def __init__(self, count: int = 0) -> None:
        self.count = 0
        self.keys: list[str] = []
        self.placed: dict[str, int] = {}
        if count:
            self.set(count)

    def set(self, count: int) -> None:
        if count == self.count:
            return
        self.keys, self.count = list(one_per_worker(MARK, count)), count
        self.placed = {}

    def known(self) -> int:
        if not self.count:
            raise RuntimeError("the worker count is not known yet: the flow needs its `WorkerCount` input")
        return self.count

    def of(self, key: str) -> int:
        """The worker Bytewax runs `key` on, remembered: for the few keys a router places (shard
        keys), where hashing each item's key in Python would cost more than the routing."""
        w = self.placed.get(key)
        if w is None:
            if len(self.placed) >= PLACED:
                self.placed.clear()  # not few keys after all: bound the memory, not the result
            w = self.placed[key] = worker_of(key, self.known())
        return w

    def worker_keys(self) -> list[str]:
        """One key per worker, in worker order: `worker_keys()[j]` lands on worker j."""
        self.known()
        return self.keys


class _Done(StatelessSourcePartition[Any]):
    def next_batch(self) -> list[Any]:
        raise StopIteration


class WorkerCount(DynamicSource[Any]):
    """An input that yields nothing: Bytewax builds it on every worker before any item flows,
    with the cluster's worker count, which `workers` (the flow's `Workers`) then holds."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Done:
        self.workers.set(worker_count)
        return _Done()
