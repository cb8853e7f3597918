"""Bytewax sink that appends items to a Redis stream, one pipelined round trip per batch.

Each item is a `dict[str, str]` of stream-entry fields. A batch becomes one non-transactional
pipeline of `XADD ... MAXLEN ~ n`, so throughput is bounded by the network round trip per batch,
not per alert. When Redis is unreachable the whole batch is retried with exponential backoff
(the worker stalls, which is the backpressure we want) and, once the attempts are spent, the
step fails loudly instead of dropping alerts.

Delivery is at-least-once: if a connection drops after Redis applied part of a pipeline, the
retry appends those entries again. Consumers de-duplicate on `txn_id` if they need to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from fraud.redis_server import connect, redact

logger = logging.getLogger(__name__)

Entry = dict[str, str]


class RedisSinkError(RuntimeError):
    """A batch could not be written after every retry."""


def xadd_batch(
    client: redis.Redis, stream: str, items: Sequence[Mapping[Any, Any]], maxlen: int
) -> list[str]:
    """Append `items` to `stream` in one pipeline (approximate MAXLEN trim); return the new ids."""
    if not items:
        return []
    with client.pipeline(transaction=False) as pipe:
        for fields in items:
            pipe.xadd(stream, dict(fields), maxlen=maxlen, approximate=True)
        ids = pipe.execute()
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


class _RedisStreamPartition(StatelessSinkPartition[Entry]):
    """One worker's connection; retries whole batches on connection loss."""

    def __init__(self, sink: RedisStreamSink, step_id: str) -> None:
        self._sink = sink
        self._step_id = step_id
        # One immediate client-level retry replaces a stale pooled connection; longer outages are
        # this partition's business, so that they are logged and bounded by its own policy.
        self._client = connect(sink.url, retry=Retry(NoBackoff(), 1))

    def write_batch(self, items: list[Entry]) -> None:
        sink = self._sink
        delay = sink.initial_backoff_s
        for attempt in range(1, sink.max_attempts + 1):
            try:
                xadd_batch(self._client, sink.stream, items, sink.maxlen)
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if attempt == sink.max_attempts:
                    raise RedisSinkError(
                        f"step {self._step_id!r}: could not write {len(items)} entries to stream "
                        f"{sink.stream!r} at {redact(sink.url)} after {attempt} attempts: {exc}"
                    ) from exc
                logger.warning(
                    "step %r: writing %d entries to %r at %s failed (%s: %s); "
                    "attempt %d/%d, retrying in %.2fs",
                    self._step_id,
                    len(items),
                    sink.stream,
                    redact(sink.url),
                    type(exc).__name__,
                    exc,
                    attempt,
                    sink.max_attempts,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, sink.max_backoff_s)

    def close(self) -> None:
        self._client.close()


class RedisStreamSink(DynamicSink[Entry]):
    """Write `dict[str, str]` items as entries of `stream`, trimmed to about `maxlen`.

    Every worker opens its own connection; entries from one worker keep their order.
    Retry policy: `max_attempts` tries, sleeping `initial_backoff_s` doubling up to
    `max_backoff_s` between them (defaults: about 20 s of outage is ridden out).
    """

    def __init__(
        self,
        url: str,
        stream: str,
        maxlen: int,
        *,
        max_attempts: int = 10,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.max_attempts = max_attempts
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s

    def __repr__(self) -> str:
        return f"RedisStreamSink({redact(self.url)!r}, {self.stream!r}, maxlen={self.maxlen})"

    def build(self, step_id: str, worker_index: int, worker_count: int) -> StatelessSinkPartition[Entry]:
        return _RedisStreamPartition(self, step_id)
