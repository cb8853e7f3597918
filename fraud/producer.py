"""Push a transactions file (and its labels) into the input shard streams, in event time.

The flow's Redis source reads `N` shard streams, `<prefix>:{0}` .. `<prefix>:{N-1}` (the braces
are a Redis Cluster hash tag: each shard lives on one slot, shards spread over the cluster). Every
entry carries `kind` ("txn" or "label") and `payload` (the raw JSON line, untouched). That wire
format (field names, stream names, the shard of a card) belongs to the reader,
`flows.redis_source`; this module writes it.

Routing keeps what the flow needs in order: a transaction goes to the shard of its `card_id`
(crc32, stable across processes), so one card's records stay in file order inside one stream; a
label goes to the shard of *its* transaction. Anything that cannot be routed (not JSON, no
`card_id`, a label for a transaction that was not in the file) goes to shard 0 unchanged: the
flow dead-letters it with a reason, the replay never drops or judges a record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec
import redis

from features.event_files import merged_records, open_text
from features.events import payload_bytes
from flows.redis_source import ENTRY_KIND, ENTRY_PAYLOAD, shard_of, shard_stream

# With --rate, flush about this often: every 10 ms, so the stream fills as steadily as one fed by
# many producers. Fewer, larger flushes make the input bursty: the flow then reads each burst as
# one batch, and a record waits for its whole burst to pass each step (docs/benchmarks.md).
RATE_FLUSHES_PER_S = 100


class _Keys(msgspec.Struct):
    """The only fields routing looks at; any type is accepted so routing itself never fails."""

    card_id: Any = None
    txn_id: Any = None


_keys_decoder = msgspec.json.Decoder(_Keys)


def route(kind: str, line: str, shards: int, txn_shards: dict[str, int]) -> int:
    """Shard of one record; remembers each transaction's shard in `txn_shards` for its label."""
    try:
        keys = _keys_decoder.decode(payload_bytes(line))
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):  # not JSON, too deep, not UTF-8
        return 0
    if kind == "txn":
        if not isinstance(keys.card_id, str) or not keys.card_id:
            return 0
        shard = shard_of(keys.card_id, shards)
        if isinstance(keys.txn_id, str):
            txn_shards.setdefault(keys.txn_id, shard)  # a duplicate txn_id keeps the first's shard
        return shard
    if kind == "label" and isinstance(keys.txn_id, str):
        return txn_shards.get(keys.txn_id, 0)
    return 0


def count_lines(*paths: Path | None) -> int:
    """Non-blank lines of the files (the records a replay will push), for a progress total."""
    total = 0
    for path in paths:
        if path is not None:
            with open_text(path) as f:
                total += sum(1 for line in f if line.strip())
    return total


def replay_files(
    client: redis.Redis,
    transactions: Path,
    labels: Path | None,
    prefix: str,
    shards: int,
    *,
    rate: float | None = None,
    flushes_per_s: float = RATE_FLUSHES_PER_S,
    batch: int = 500,
    maxlen: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """XADD every record of both files, merged in event time, to its shard stream.

    One non-transactional pipeline per `batch` records. `rate` is the average number of records
    per second overall (None: as fast as Redis takes them), sent in about `flushes_per_s`
    pipelines a second; `maxlen` trims each shard to about
    that many entries (None: no trim; beware that trimming drops entries the flow has not read
    yet when the replay runs ahead of it). `on_progress(n)` is called after each batch with the
    number of records it pushed. Returns counts per kind and per shard, and the seconds taken.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if flushes_per_s <= 0:
        raise ValueError(f"flushes_per_s must be > 0, got {flushes_per_s}")
    if rate is not None:
        batch = max(1, min(batch, int(rate / flushes_per_s)))
    streams = [shard_stream(prefix, i) for i in range(shards)]
    per_shard = [0] * shards
    kinds = {"txn": 0, "label": 0}
    txn_shards: dict[str, int] = {}
    records = merged_records(transactions, labels)
    start = time.monotonic()
    sent = 0
    while chunk := list(islice(records, batch)):
        with client.pipeline(transaction=False) as pipe:
            for kind, line, _ in chunk:
                shard = route(kind, line, shards, txn_shards)
                fields = {ENTRY_KIND: kind, ENTRY_PAYLOAD: payload_bytes(line)}  # byte-exact
                if maxlen is None:
                    pipe.xadd(streams[shard], fields)  # type: ignore[arg-type]
                else:
                    pipe.xadd(streams[shard], fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
                per_shard[shard] += 1
                kinds[kind] = kinds.get(kind, 0) + 1
            pipe.execute()
        sent += len(chunk)
        if on_progress is not None:
            on_progress(len(chunk))
        if rate is not None:
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return {
        "transactions": kinds["txn"],
        "labels": kinds["label"],
        "records": sent,
        "shards": shards,
        "streams": streams,
        "per_shard": per_shard,
        "seconds": round(time.monotonic() - start, 3),
    }
