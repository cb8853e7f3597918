"""The flow's sources and sinks, built from settings: files or Redis shard streams in, Redis out."""

from __future__ import annotations

from typing import Any

from bytewax.inputs import Source
from bytewax.outputs import Sink

from flows.file_source import FileReplaySource
from flows.redis_sink import RedisStreamSink
from flows.redis_source import RedisShardSource
from service.runtime import Runtime


def source(rt: Runtime) -> Source[Any]:
    """`FRAUD_SOURCE=file` replays the files in event time; `redis` reads the shard streams."""
    s = rt.settings
    if s.source == "redis":
        return RedisShardSource(
            rt.redis_url,
            s.input_stream,
            s.input_shards,
            batch_size=s.source_batch_size,
            block_ms=s.source_block_ms,
            poll_ms=s.source_poll_ms,
            linger_ms=s.source_linger_ms,
            idle_ms=s.source_idle_ms,
            idle_exit_s=s.source_idle_exit_s,
            retry_budget_s=s.redis_retry_budget_s,
        )
    return FileReplaySource(s.transactions_path, s.labels_path, s.source_batch_size)


def stream(rt: Runtime, name: str, dedupe_field: str, dedupe_ttl_s: int | None = None) -> Sink[Any]:
    """An idempotent, trimmed Redis stream sink: a replayed record is written once, an outage is
    ridden out for `FRAUD_REDIS_RETRY_BUDGET_S`."""
    s = rt.settings
    return RedisStreamSink(
        rt.redis_url,
        name,
        s.stream_maxlen,
        dedupe_field=dedupe_field,
        dedupe_ttl_s=dedupe_ttl_s or s.dedupe_ttl_s,
        retention_s=None if s.stream_retention_days is None else s.stream_retention_days * 86_400,
        retry_budget_s=s.redis_retry_budget_s,
    )


def decision_log(rt: Runtime) -> Sink[Any]:
    """The decision log's sink: an audit trail, never trimmed by count (a reader that falls behind
    loses nothing); entries older than `FRAUD_DECISION_RETENTION_DAYS` are dropped, and counted."""
    s = rt.settings
    return RedisStreamSink(
        rt.redis_url,
        s.decision_stream,
        None,
        dedupe_field="txn_id",
        dedupe_ttl_s=s.decision_dedupe_ttl_s,
        retention_s=s.decision_retention_days * 86_400,
        retry_budget_s=s.redis_retry_budget_s,
    )
