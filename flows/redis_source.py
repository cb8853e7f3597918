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
hold up the watermarks every other process is waiting for (`flows.ordering`). A read that caught
up (fewer entries than `batch_size`) asks Bytewax to come back after `linger_ms`, so that what
arrives meanwhile comes as one batch: every batch costs each step an activation whatever its
size, and in a cluster its watermarks cross every step on every process. A full batch (a
backlog) is followed at once.
When Redis is unreachable, hung or loading the partition returns nothing and asks Bytewax to come
back later (exponential backoff, 0.1 s to 5 s), for at most `retry_budget_s`
(`FRAUD_REDIS_RETRY_BUDGET_S`, 30 s) per outage; then it raises `RedisUnavailableError`. The
position advances only over entries actually returned, so an outage loses nothing: with recovery
on, a restart resumes from the snapshot. A wrong password or a missing ACL permission (on XREAD,
XREVRANGE or the lag gauge's XRANGE) raises `RedisConfigError` at the first read, naming the URL
(password redacted) and what to fix, rather than being retried or silently ignored. Before
raising, the partition tells the progress summary (`flows.outputs.mark_failed`).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import redis
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from features.events import Record
from flows.outputs import EPOCH_PAUSES, mark_failed
from flows.stamping import TICK
from service.redis_client import (
    DEFAULT_RETRY_BUDGET_S,
    Outage,
    RedisConfigError,
    RedisUnavailableError,
    diagnosis,
    is_outage,
    is_refusal,
    partition_client,
    redact,
)
from service.telemetry import EPOCH_PAUSE, REDIS_ERRORS, SOURCE_LAG

logger = logging.getLogger(__name__)

# The input wire format, owned here (the reader); `fraud.producer` and the fuzzer write it.
ENTRY_KIND = "kind"
ENTRY_PAYLOAD = "payload"


def shard_stream(prefix: str, shard: int) -> str:
    """Name of input shard `shard`: `<prefix>:{<shard>}` (a Redis Cluster hash tag)."""
    return f"{prefix}:{{{shard}}}"


def shard_of(card_id: str, shards: int) -> int:
    """The shard of a card: crc32 of its id modulo `shards`, the same in every process."""
    return zlib.crc32(card_id.encode()) % shards


KINDS = frozenset({"txn", "label", "control"})
UNKNOWN = "unknown"
LAG_REFRESH_S = 1.0
# What a read can fail with; `service.redis_client.is_outage` tells waiting from fixing.
_READ_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)


def _text(value: Any) -> str:
    # surrogateescape: a payload that is not UTF-8 keeps its exact bytes (`features.events.payload_bytes`)
    return value.decode("utf-8", errors="surrogateescape") if isinstance(value, bytes) else str(value)


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
        self._client = partition_client(source.url, source.retry_budget_s, wait_s=source.block_ms / 1000)
        self._lag = SOURCE_LAG.labels(shard=self._shard)
        self._lag_due = 0.0
        self._last_data = time.monotonic()
        self._ticked = False
        self._outage = Outage(source.retry_budget_s, logger)
        self._awake: datetime | None = None
        self._closed: float | None = None  # when Bytewax last took this partition's snapshot

    def next_batch(self) -> list[Record]:
        src = self._source
        began = time.monotonic()
        if self._closed is not None:  # the first poll after an epoch close: how long it held the input
            EPOCH_PAUSE.observe(began - self._closed)
            EPOCH_PAUSES.add(began - self._closed)
            self._closed = None
        try:
            reply = self._read()
        except _READ_ERRORS as exc:  # BusyLoadingError, AuthenticationError: ConnectionErrors
            self._on_error(exc, began)
            return []
        self._outage.over(self._what)
        self._awake = None  # no backoff pending any more
        batch: list[Record] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._position = _text(entry_id)
                batch.append(to_record(fields, f"{self._stream}#{self._position}"))
        now = time.monotonic()
        if batch:
            self._last_data, self._ticked = now, False
            if src.linger_ms and len(batch) < src.batch_size:  # caught up: let the next batch fill
                self._awake = datetime.now(UTC) + timedelta(milliseconds=src.linger_ms)
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
        # Bytewax takes it as it closes the epoch, then polls again once the epoch is saved.
        self._closed = time.monotonic()
        return self._position

    def close(self) -> None:
        self._client.close()

    @property
    def _what(self) -> str:
        return f"reading {self._stream!r} at {redact(self._source.url)}"

    def _read(self) -> Any:
        """One XREAD from the position (pinned first if it is "$")."""
        src = self._source
        if self._position == "$":  # "only new entries": pin it so the snapshot is a real id
            last = self._client.xrevrange(self._stream, count=1)
            self._position = _text(last[0][0]) if last else "0-0"
        return self._client.xread(
            {self._stream: self._position},
            count=src.batch_size,
            block=src.block_ms or None,  # redis-py's block=0 would mean "forever"
        )

    def _on_error(self, exc: redis.RedisError, began: float) -> None:
        """Count the failure and schedule the next try with backoff (the outage logs its start
        once); raise when waiting cannot help or the retry budget is spent."""
        if not is_outage(exc):
            self._refused(exc)
        REDIS_ERRORS.labels(op="xread").inc()
        kept = f"; position {self._position} kept"
        delay = self._outage.failed(self._what, exc, began, note=kept)
        if delay is None:
            resume = f"{kept}: with recovery on, a restart resumes from the snapshot and loses nothing"
            error = RedisUnavailableError(self._outage.give_up(self._what, exc, note=resume))
            mark_failed(str(error))
            raise error from exc
        self._awake = datetime.now(UTC) + timedelta(seconds=delay)

    def _refused(self, exc: redis.RedisError) -> NoReturn:
        """Stop the flow on an error waiting cannot fix: the wrong password, a missing ACL
        permission, a key of the wrong type."""
        error = RedisConfigError(f"{self._what}: Redis refused it ({diagnosis(exc)}): {exc}")
        mark_failed(str(error))
        raise error from exc

    def _refresh_lag(self, now: float) -> None:
        """Lag = stream-id time of the newest entry minus that of the first unread one (0 if none).

        Measured from the first unread entry rather than the position itself, so a fresh start
        (`0-0`) or a position trimmed away still gives a meaningful number. A missing permission
        stops the flow like one on XREAD: a gauge stuck at 0 would hide the lag.
        """
        self._lag_due = now + LAG_REFRESH_S
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.xrevrange(self._stream, count=1)
                pipe.xrange(self._stream, min=f"({self._position}", count=1)
                newest, unread = pipe.execute()
        except _READ_ERRORS as exc:
            if is_outage(exc):  # the next read deals with the outage
                REDIS_ERRORS.labels(op="source_lag").inc()
                return
            if is_refusal(exc):
                self._refused(exc)  # NOPERM on XRANGE: the gauge would silently read 0
            return  # e.g. a position Redis cannot parse: no lag to report
        if newest and unread:
            gap_ms = _id_ms(_text(newest[0][0])) - _id_ms(_text(unread[0][0]))
            self._lag.set(max(0, gap_ms) / 1000)
        else:
            self._lag.set(0)


class RedisShardSource(FixedPartitionedSource[Record, str]):
    """`shards` partitions, one per stream `<prefix>:{i}`, read from `start_id` or the snapshot.

    `start_id`: "0-0" reads each stream from its start, "$" only what is added after the first
    poll. `block_ms`: longest one read waits for data (0: never waits). `poll_ms`: after a read
    that found nothing, how long until the next one (the worker is free meanwhile). `linger_ms`:
    after a read that found fewer than `batch_size` entries, how long until the next one.
    `idle_ms`: a partition that found nothing for that long hands on one `("tick", "", "<stream>#")` record,
    so that the flow stops waiting for it (`flows.ordering`). `idle_exit_s`: a partition ends once
    it returned nothing for that long (backfills, tests); None runs forever. An outage does not
    count as idle: a partition never ticks nor ends while it cannot tell whether data is waiting.
    `retry_budget_s`: how long one outage is ridden out before the partition raises.
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
        linger_ms: int = 0,
        idle_ms: int = 250,
        idle_exit_s: float | None = None,
        start_id: str = "0-0",
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if min(block_ms, poll_ms, linger_ms) < 0:
            raise ValueError(
                f"block_ms, poll_ms and linger_ms must be >= 0, got {block_ms}, {poll_ms} and {linger_ms}"
            )
        if retry_budget_s <= 0:
            raise ValueError(f"retry_budget_s must be > 0, got {retry_budget_s}")
        self.url = url
        self.prefix = prefix
        self.shards = shards
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.poll_ms = poll_ms
        self.linger_ms = linger_ms
        self.idle_ms = idle_ms
        self.idle_exit_s = idle_exit_s
        self.start_id = start_id
        self.retry_budget_s = retry_budget_s

    def __repr__(self) -> str:
        return f"RedisShardSource({redact(self.url)!r}, {self.prefix!r}, {self.shards})"

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self.shards)]

    def build_part(self, step_id: str, for_part: str, resume_state: str | None) -> _ShardPartition:
        return _ShardPartition(self, int(for_part), resume_state or self.start_id)
