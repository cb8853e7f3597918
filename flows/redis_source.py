"""Read the input shard streams (`<prefix>:{0}` .. `{N-1}`) as a resumable Bytewax source.

One Bytewax partition per shard stream. Bytewax, not a consumer group, owns the position: a
partition's snapshot is the id of the last entry it handed out, so a flow resumed from recovery
re-reads exactly what came after it, and nothing has to be acknowledged in Redis.

Records are `(kind, payload, origin)` like `flows.file_source.FileReplaySource`'s, so the flow's
decoder handles either source; the origin is `<stream>#<entry id>`. An entry without a usable
`kind` / `payload` is handed on as `("unknown", <its fields as JSON>, origin)`: the decoder dead-letters it (`unknown_kind`), it never
crashes the flow nor vanishes (and a stray `kind` value never becomes a metric label).

Each poll is one `XREAD COUNT batch_size`, which does not wait (`block_ms`, 0 by default): a
shard with nothing new asks Bytewax to come back after `poll_ms` instead, and the worker goes on
with the rest of the flow meanwhile. In a cluster that matters: a worker blocked in a read would
hold up the watermarks every other process is waiting for (`flows.ordering`).
When Redis is unreachable the partition returns nothing and asks Bytewax to come back later
(exponential backoff, 0.1 s to 5 s); the position advances only over entries actually returned,
so an outage loses nothing.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from features.events import Record
from flows.ordering import TICK
from fraud.metrics import REDIS_ERRORS, SOURCE_LAG
from fraud.redis_server import connect, redact
from fraud.replay import ENTRY_KIND, ENTRY_PAYLOAD, shard_stream

logger = logging.getLogger(__name__)

KINDS = frozenset({"txn", "label"})
UNKNOWN = "unknown"
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
LAG_REFRESH_S = 1.0


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: str) -> int:
    """Milliseconds part of a stream id (`<ms>-<seq>`)."""
    return int(entry_id.split("-", 1)[0])


def to_record(fields: dict[Any, Any] | None, origin: str) -> Record:
    """The `(kind, payload, origin)` of one stream entry; anything unusable becomes an "unknown"
    record."""
    f = {_text(k): _text(v) for k, v in (fields or {}).items()}
    kind, payload = f.get(ENTRY_KIND), f.get(ENTRY_PAYLOAD)
    if kind in KINDS and payload is not None:
        return kind, payload, origin
    return UNKNOWN, json.dumps(f, ensure_ascii=False, sort_keys=True), origin


class _ShardPartition(StatefulSourcePartition[Record, str]):
    """Reads one shard stream from `position` (exclusive); the snapshot is the last id returned."""

    def __init__(self, source: RedisShardSource, shard: int, position: str) -> None:
        self._source = source
        self._shard = str(shard)
        self._stream = shard_stream(source.prefix, shard)
        self._position = position
        # One immediate client-level retry replaces a stale pooled connection (after a server
        # restart); longer outages are this partition's business: logged once, backed off.
        self._client = connect(source.url, retry=Retry(NoBackoff(), 1), socket_connect_timeout=2.0)
        self._lag = SOURCE_LAG.labels(shard=self._shard)
        self._lag_due = 0.0
        self._last_data = time.monotonic()
        self._ticked = False
        self._down_since: float | None = None
        self._backoff = INITIAL_BACKOFF_S
        self._awake: datetime | None = None

    def next_batch(self) -> list[Record]:
        src = self._source
        try:
            if self._position == "$":  # "only new entries": pin it so the snapshot is a real id
                last = self._client.xrevrange(self._stream, count=1)
                self._position = _text(last[0][0]) if last else "0-0"
            reply: Any = self._client.xread(
                {self._stream: self._position},
                count=src.batch_size,
                block=src.block_ms or None,  # redis-py's block=0 would mean "forever"
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # BusyLoadingError included
            self._on_error(exc)
            return []
        if self._down_since is not None:
            logger.info(
                "reading %r at %s again after %.1fs",
                self._stream,
                redact(src.url),
                time.monotonic() - self._down_since,
            )
            self._down_since, self._backoff, self._awake = None, INITIAL_BACKOFF_S, None
        batch: list[Record] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._position = _text(entry_id)
                batch.append(to_record(fields, f"{self._stream}#{self._position}"))
        now = time.monotonic()
        if batch:
            self._last_data, self._ticked, self._awake = now, False, None
        elif src.poll_ms:
            self._awake = datetime.now(UTC) + timedelta(milliseconds=src.poll_ms)
        if now >= self._lag_due:
            self._refresh_lag(now)
        if not batch and src.idle_exit_s is not None and now - self._last_data >= src.idle_exit_s:
            raise StopIteration
        if not batch and not self._ticked and (now - self._last_data) * 1000 >= src.idle_ms:
            self._ticked = True  # once per quiet spell: this shard stops holding the others back
            return [(TICK, "", f"{self._stream}#")]
        return batch

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> str:
        return self._position

    def close(self) -> None:
        self._client.close()

    def _on_error(self, exc: Exception) -> None:
        """Count the failure, warn once per outage, and schedule the next try with backoff."""
        REDIS_ERRORS.labels(op="xread").inc()
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning(
                "cannot read %r at %s (%s: %s); retrying with backoff up to %.0fs, position %s kept",
                self._stream,
                redact(self._source.url),
                type(exc).__name__,
                exc,
                MAX_BACKOFF_S,
                self._position,
            )
        self._awake = datetime.now(UTC) + timedelta(seconds=self._backoff)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    def _refresh_lag(self, now: float) -> None:
        """Lag = stream-id time of the newest entry minus that of the first unread one (0 if none).

        Measured from the first unread entry rather than the position itself, so a fresh start
        (`0-0`) or a position trimmed away still gives a meaningful number.
        """
        self._lag_due = now + LAG_REFRESH_S
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.xrevrange(self._stream, count=1)
                pipe.xrange(self._stream, min=f"({self._position}", count=1)
                newest, unread = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            REDIS_ERRORS.labels(op="source_lag").inc()
            return
        except redis.ResponseError:  # e.g. a position Redis cannot parse: no lag to report
            return
        if newest and unread:
            gap_ms = _id_ms(_text(newest[0][0])) - _id_ms(_text(unread[0][0]))
            self._lag.set(max(0, gap_ms) / 1000)
        else:
            self._lag.set(0)


class RedisShardSource(FixedPartitionedSource[Record, str]):
    """`shards` partitions, one per stream `<prefix>:{i}`, read from `start_id` or the snapshot.

    `start_id`: "0-0" reads each stream from its start, "$" only what is added after the first
    poll. `block_ms`: longest one read waits for data (0: never waits). `poll_ms`: after a read
    that found nothing, how long until the next one (the worker is free meanwhile). `idle_ms`: a
    partition that found nothing for that long hands on one `("tick", "", "<stream>#")` record,
    so that the flow stops waiting for it (`flows.ordering`). `idle_exit_s`: a partition ends once
    it returned nothing for that long (backfills, tests); None runs forever. An outage does not
    count as idle: a partition never ticks nor ends while it cannot tell whether data is waiting.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        shards: int,
        *,
        batch_size: int = 1000,
        block_ms: int = 0,
        poll_ms: int = 5,
        idle_ms: int = 250,
        idle_exit_s: float | None = None,
        start_id: str = "0-0",
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if block_ms < 0 or poll_ms < 0:
            raise ValueError(f"block_ms and poll_ms must be >= 0, got {block_ms} and {poll_ms}")
        self.url = url
        self.prefix = prefix
        self.shards = shards
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.poll_ms = poll_ms
        self.idle_ms = idle_ms
        self.idle_exit_s = idle_exit_s
        self.start_id = start_id

    def __repr__(self) -> str:
        return f"RedisShardSource({redact(self.url)!r}, {self.prefix!r}, {self.shards})"

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self.shards)]

    def build_part(self, step_id: str, for_part: str, resume_state: str | None) -> _ShardPartition:
        return _ShardPartition(self, int(for_part), resume_state or self.start_id)
