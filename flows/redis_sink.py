"""Bytewax sink that appends items to a Redis stream, one pipelined round trip per batch.

Each item is a `dict[str, str]` of stream-entry fields. A batch becomes one non-transactional
pipeline, so throughput is bounded by the network round trip per batch, not per entry. When Redis
cannot take the batch (unreachable, hung past the socket timeout, loading, full: OOM) the whole
batch is retried with exponential backoff (the worker stalls, which is the backpressure we want)
and, once the outage has lasted `retry_budget_s` (`FRAUD_REDIS_RETRY_BUDGET_S`, 30 s), the step
fails loudly instead of dropping entries; the outage is logged when it starts and when it ends,
not per attempt (`service.redis_client.Outage`). Errors that waiting cannot fix (wrong password,
missing ACL permission) fail at once, naming the step. Either failure is first reported to the
progress summary (`flows.outputs.mark_failed`), so the run ends `[stopped]`, not `[done]`.

**Exactly-once entries.** Bytewax recovery replays everything after the last snapshot, and a
connection may drop after Redis applied part of a pipeline; both re-send entries. With
`dedupe_field` (e.g. `txn_id` for alerts), every entry is written by one Lua script that
atomically sets a marker `<stream>:sent:<value>` (`SET NX EX dedupe_ttl_s`) and appends the
entry only if the marker is new; a re-sent entry finds its marker and is skipped (counted in
`fraud_sink_duplicates_total{stream}`). A consumer of the stream therefore sees each record once,
as long as the replay comes within `dedupe_ttl_s`. Without `dedupe_field` a plain `XADD` is used
(at-least-once).

**Redis Cluster.** The script touches the stream and its marker, which must live in one hash
slot: name the streams with a hash tag, e.g. `{fraud}:alerts`, so that the markers
(`{fraud}:alerts:sent:<txn_id>`) share the stream's slot. On a single server any name works.

**Retention.** Every `XADD` trims to about `maxlen` entries (`MAXLEN ~`); with `retention_s`
each batch also ends with `XTRIM <stream> MINID <now - retention_s>` (entry ids are the
server's clock in ms), in the same pipeline. With `maxlen=None` nothing is trimmed by count
(the decision log, an audit trail: only by age), and every entry a trim removes is counted in
`fraud_stream_trimmed_total{stream}`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from flows.outputs import mark_failed
from service import telemetry
from service.redis_client import (
    DEFAULT_RETRY_BUDGET_S,
    INITIAL_BACKOFF_S,
    MAX_BACKOFF_S,
    Outage,
    RedisConfigError,
    RedisUnavailableError,
    diagnosis,
    is_outage,
    partition_client,
    redact,
)

logger = logging.getLogger(__name__)

Entry = dict[str, str]
_E = TypeVar("_E", bound=Exception)

DEFAULT_DEDUPE_TTL_S = 7 * 86_400

# KEYS[1] stream, KEYS[2] marker; ARGV[1] marker TTL (s), ARGV[2] MAXLEN (0: none), ARGV[3..]
# field, value... SET NX answers nil (false in Lua) when the marker exists: the entry was already
# written.
DEDUPE_XADD_LUA = """\
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return false
end
if ARGV[2] == '0' then
  return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""
DEDUPE_XADD_SHA = hashlib.sha1(DEDUPE_XADD_LUA.encode()).hexdigest()


class RedisSinkError(RuntimeError):
    """A batch could not be written: Redis refused it, or stayed unavailable for the budget."""


class RedisSinkRefused(RedisSinkError, RedisConfigError):
    """Redis refused a batch for a reason waiting cannot fix (password, ACL, key type)."""


class RedisSinkUnavailable(RedisSinkError, RedisUnavailableError):
    """Redis could not take a batch for the whole retry budget."""


def _stopping(error: _E) -> _E:
    """`error`, once the progress summary knows that the flow stops on it."""
    mark_failed(str(error))
    return error


def marker_key(stream: str, value: str) -> str:
    """The key whose existence says the entry identified by `value` was written to `stream`."""
    return f"{stream}:sent:{value}"


def reset_streams(client: redis.Redis, streams: Sequence[str]) -> tuple[int, int]:
    """Delete `streams` and their de-duplication markers (else a replay would write nothing).

    Returns (streams deleted, markers deleted).
    """
    deleted = int(client.delete(*streams)) if streams else 0
    markers = 0
    for stream in streams:
        pattern = marker_key(re.sub(r"([*?\[\]\\])", r"\\\1", stream), "*")
        batch: list[Any] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                markers += int(client.delete(*batch))
                batch.clear()
        if batch:
            markers += int(client.delete(*batch))
    return deleted, markers


@dataclass(frozen=True)
class Dedupe:
    """Write entries through the de-duplicating script, identified by their `field`."""

    field: str
    ttl_s: int = DEFAULT_DEDUPE_TTL_S


def _decode(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flat_fields(fields: Mapping[Any, Any]) -> list[Any]:
    flat: list[Any] = []
    for key, value in fields.items():
        flat += [key, value]
    return flat


def _dedupe_value(stream: str, fields: Mapping[Any, Any], field: str) -> str:
    value = fields.get(field)
    if value is None or value == "":
        # An empty id would share one marker among all such entries and silently drop them.
        raise ValueError(f"entry for stream {stream!r} has no {field!r} to de-duplicate on: {dict(fields)!r}")
    return _decode(value)


def _minid(retention_s: float) -> str:
    return str(max(0, int(time.time() * 1000 - retention_s * 1000)))


def write_entries(
    client: redis.Redis,
    stream: str,
    items: Sequence[Mapping[Any, Any]],
    maxlen: int | None,
    *,
    dedupe: Dedupe | None = None,
    retention_s: float | None = None,
    trimmed: list[int] | None = None,
) -> list[str | None]:
    """Append `items` to `stream` in one pipeline; return each new id, None for a duplicate.

    With `dedupe`, entries go through the marker script (EVALSHA; on NOSCRIPT the script is
    loaded with SCRIPT LOAD and only the entries that were not run are sent again, so nothing is
    applied twice). `maxlen` None: no trim by count. With `retention_s`, the pipeline ends with
    one `XTRIM MINID` (exact: everything older goes), whose count of removed entries is appended to `trimmed` when given.
    Redis errors other than connection loss are raised (the first one).
    """
    if not items:
        return []
    pending = list(range(len(items)))
    results: list[str | None] = [None] * len(items)
    markers = (
        [marker_key(stream, _dedupe_value(stream, fields, dedupe.field)) for fields in items]
        if dedupe is not None
        else []
    )
    trim = retention_s is not None
    for attempt in (1, 2):  # the second round only after a NOSCRIPT
        with client.pipeline(transaction=False) as pipe:
            for i in pending:
                if dedupe is None:
                    pipe.xadd(stream, dict(items[i]), maxlen=maxlen, approximate=maxlen is not None)
                else:
                    args = [dedupe.ttl_s, maxlen or 0, *_flat_fields(items[i])]
                    pipe.evalsha(DEDUPE_XADD_SHA, 2, stream, markers[i], *args)
            if trim:
                assert retention_s is not None
                pipe.xtrim(stream, minid=_minid(retention_s), approximate=False)
            replies = pipe.execute(raise_on_error=False)
        if trim:
            if isinstance(replies[-1], Exception):
                raise replies[-1]
            if trimmed is not None:
                trimmed.append(int(replies[-1]))
            replies, trim = replies[:-1], False  # trimmed: not again in a NOSCRIPT round
        unloaded: list[int] = []
        for i, reply in zip(pending, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                unloaded.append(i)
            elif isinstance(reply, Exception):
                raise reply
            else:
                results[i] = None if reply is None else _decode(reply)
        if not unloaded:
            return results
        if attempt == 2:
            raise RedisSinkError(
                f"stream {stream!r}: the dedupe script vanished again right after SCRIPT LOAD"
            )
        sha = _decode(client.script_load(DEDUPE_XADD_LUA))
        if sha != DEDUPE_XADD_SHA:
            raise RedisSinkError(f"SCRIPT LOAD returned {sha}, expected {DEDUPE_XADD_SHA}")
        pending = unloaded
    raise AssertionError("unreachable")


def xadd_batch(
    client: redis.Redis, stream: str, items: Sequence[Mapping[Any, Any]], maxlen: int
) -> list[str]:
    """Append `items` to `stream` in one pipeline (approximate MAXLEN trim); return the new ids."""
    return [i for i in write_entries(client, stream, items, maxlen) if i is not None]


class _RedisStreamPartition(StatelessSinkPartition[Entry]):
    """One worker's connection; retries whole batches through an outage, within the budget."""

    def __init__(self, sink: RedisStreamSink, step_id: str) -> None:
        self._sink = sink
        self._step_id = step_id
        self._client = partition_client(sink.url, sink.retry_budget_s)
        self._dedupe = Dedupe(sink.dedupe_field, sink.dedupe_ttl_s) if sink.dedupe_field else None
        self._outage = Outage(
            sink.retry_budget_s,
            logger,
            initial_backoff_s=sink.initial_backoff_s,
            max_backoff_s=sink.max_backoff_s,
        )

    def _where(self, n: int) -> str:
        return f"step {self._step_id!r}: writing {n} entries to stream {self._sink.stream!r} at {redact(self._sink.url)}"

    def write_batch(self, items: list[Entry]) -> None:
        sink = self._sink
        while True:
            began = time.monotonic()
            trimmed: list[int] = []
            try:
                ids = write_entries(
                    self._client,
                    sink.stream,
                    items,
                    sink.maxlen,
                    dedupe=self._dedupe,
                    retention_s=sink.retention_s,
                    trimmed=trimmed,
                )
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                self._retry_or_raise(exc, began, len(items))
            else:
                self._outage.over(self._where(len(items)))
                duplicates = ids.count(None) if self._dedupe is not None else 0
                if duplicates:
                    telemetry.SINK_DUPLICATES.labels(stream=sink.stream).inc(duplicates)
                if sum(trimmed):
                    telemetry.STREAM_TRIMMED.labels(stream=sink.stream).inc(sum(trimmed))
                return

    def _retry_or_raise(self, exc: redis.RedisError, began: float, n: int) -> None:
        """Sleep before the next attempt of an outage; raise when waiting cannot help or the
        budget is spent. Every failed attempt counts in `fraud_redis_errors_total{op="xadd"}`."""
        where = self._where(n)
        if not is_outage(exc):
            raise _stopping(RedisSinkRefused(f"{where}: Redis refused it ({diagnosis(exc)}): {exc}")) from exc
        telemetry.REDIS_ERRORS.labels(op="xadd").inc()
        delay = self._outage.failed(where, exc, began)
        if delay is None:
            raise _stopping(RedisSinkUnavailable(self._outage.give_up(where, exc))) from exc
        time.sleep(delay)

    def close(self) -> None:
        self._client.close()


class RedisStreamSink(DynamicSink[Entry]):
    """Write `dict[str, str]` items as entries of `stream`, trimmed to about `maxlen` (None: never
    by count).

    Every worker opens its own connection; entries from one worker keep their order.
    `dedupe_field` names the field identifying a record (its marker lives `dedupe_ttl_s`); None
    writes plain XADDs. `retention_s` also drops entries older than that (MINID trim per batch).
    Retry policy: an outage is ridden out for `retry_budget_s` seconds of wall-clock time,
    sleeping `initial_backoff_s` doubling up to `max_backoff_s` between attempts; one attempt
    may overrun the budget by its socket timeout (`service.redis_client.io_timeout_s`, <= 5 s).
    """

    def __init__(
        self,
        url: str,
        stream: str,
        maxlen: int | None,
        *,
        dedupe_field: str | None = None,
        dedupe_ttl_s: int = DEFAULT_DEDUPE_TTL_S,
        retention_s: float | None = None,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        initial_backoff_s: float = INITIAL_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be >= 1 or None, got {maxlen}")
        if retry_budget_s <= 0:
            raise ValueError(f"retry_budget_s must be > 0, got {retry_budget_s}")
        if dedupe_ttl_s < 1:
            raise ValueError(f"dedupe_ttl_s must be >= 1, got {dedupe_ttl_s}")
        if retention_s is not None and retention_s <= 0:
            raise ValueError(f"retention_s must be > 0, got {retention_s}")
        if dedupe_field == "":
            raise ValueError("dedupe_field must be a field name or None")
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.dedupe_field = dedupe_field
        self.dedupe_ttl_s = dedupe_ttl_s
        self.retention_s = retention_s
        self.retry_budget_s = retry_budget_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s

    def __repr__(self) -> str:
        return (
            f"RedisStreamSink({redact(self.url)!r}, {self.stream!r}, maxlen={self.maxlen}, "
            f"dedupe_field={self.dedupe_field!r}, retention_s={self.retention_s})"
        )

    def build(self, step_id: str, worker_index: int, worker_count: int) -> StatelessSinkPartition[Entry]:
        return _RedisStreamPartition(self, step_id)
