"""Reading back what a test or drill wrote to a Redis stream."""

from __future__ import annotations

import io
from typing import Any

import redis

from fraud.consumer import consume


def entries(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    """Every entry of `stream`, oldest first, fields decoded."""
    rows: list[Any] = client.xrange(stream)  # type: ignore[assignment]
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]


def txn_ids(client: redis.Redis, stream: str) -> list[str]:
    """The `txn_id` field of every entry of `stream`, oldest first."""
    rows: list[Any] = client.xrange(stream)  # type: ignore[assignment]
    return [fields[b"txn_id"].decode() for _, fields in rows]


def drain(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str = "me",
    *,
    as_json: bool,
    limit: int | None = None,
    out: io.StringIO | None = None,
    **kw: Any,
) -> tuple[int, str]:
    """`fraud.consumer.consume` without follow: (entries printed, the printed text)."""
    out = io.StringIO() if out is None else out
    n = consume(client, stream, group, consumer, follow=False, as_json=as_json, limit=limit, out=out, **kw)
    return n, out.getvalue()
