"""Reading alerts back from the Redis stream, for `fraud alerts`.

Alerts are consumed through a consumer group so several terminals (or a later run of the
command) share the work and each alert is shown once: entries are read with `>` (never
delivered to the group before), printed, then acknowledged. Formatting never raises on a
malformed entry: a missing or unparseable field is shown as `?`, because an operator tailing
alerts must not lose the stream to one bad record.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import redis

UNKNOWN = "?"
FOLLOW_BLOCK_MS = 1000
BATCH = 100

Alert = tuple[str, dict[str, str]]


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def ensure_group(client: redis.Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """Create `group` on `stream` (and the stream itself); False if the group already existed."""
    try:
        client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True


def read_alerts(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    count: int = BATCH,
    block_ms: int | None = None,
) -> list[Alert]:
    """Up to `count` entries never delivered to `group`, as `(id, fields)` with str values.

    `block_ms=None` returns at once (possibly nothing); otherwise waits up to that long.
    """
    response: Any = client.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
    if not response:
        return []
    # RESP2 answers [[stream, entries]]; RESP3 answers {stream: entries}.
    batches = response.values() if isinstance(response, dict) else (e for _, e in response)
    alerts: list[Alert] = []
    for entries in batches:
        for entry_id, fields in entries:
            decoded = {_text(k): _text(v) for k, v in (fields or {}).items()}
            alerts.append((_text(entry_id), decoded))
    return alerts


def ack(client: redis.Redis, stream: str, group: str, ids: Iterable[str]) -> int:
    """Acknowledge `ids` in `group`; returns how many were pending."""
    ids = list(ids)
    return int(client.xack(stream, group, *ids)) if ids else 0


def pending_count(client: redis.Redis, stream: str, group: str) -> int:
    """Entries delivered to `group` but not yet acknowledged."""
    return int(client.xpending(stream, group)["pending"])


def stream_length(client: redis.Redis, stream: str) -> int:
    """Number of entries currently kept in `stream`."""
    return int(client.xlen(stream))


def parse_reasons(raw: str | None) -> list[Any] | None:
    """The `reasons` field decoded from JSON, or None when missing or not a JSON list."""
    if raw is None:
        return None
    try:
        reasons = json.loads(raw)
    except ValueError:
        return None
    return reasons if isinstance(reasons, list) else None


def _num(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return UNKNOWN
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return UNKNOWN


def _reason(item: Any) -> str:
    if not isinstance(item, dict):
        return UNKNOWN
    feature = item.get("feature")
    value = item.get("value", UNKNOWN)
    shown = "na" if value is None else _num(value, ".4g")
    return f"{feature if feature else UNKNOWN}={shown} ({_num(item.get('contribution'), '+.3f')})"


def format_alert(fields: Mapping[str, str]) -> str:
    """One human-readable line for an alert entry; missing or malformed parts show as `?`."""

    def get(key: str) -> str:
        return fields.get(key) or UNKNOWN

    reasons = parse_reasons(fields.get("reasons"))
    why = UNKNOWN if reasons is None else (", ".join(map(_reason, reasons)) or "none")
    return (
        f"{get('ts')}  txn={get('txn_id')}  card={get('card_id')}  merchant={get('merchant_id')}  "
        f"score={_num(fields.get('score'))} (xgb {_num(fields.get('xgb_score'))}, "
        f"online {_num(fields.get('online_score'))}; threshold {_num(fields.get('threshold'))})  "
        f"model={get('model_version')}  reasons: {why}"
    )


def alert_json(entry_id: str, fields: Mapping[str, str]) -> str:
    """One JSON object: the entry id and its fields, `reasons` decoded when it is valid JSON."""
    body: dict[str, Any] = dict(fields)
    if "reasons" in body:
        parsed = parse_reasons(body["reasons"])
        if parsed is not None:
            body["reasons"] = parsed
    return json.dumps({"id": entry_id, "fields": body}, separators=(",", ":"))


def consume(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    follow: bool,
    as_json: bool,
    limit: int | None,
    out: TextIO = sys.stdout,
) -> int:
    """Print new alerts of `group`, acknowledging each batch once printed; return how many.

    Without `follow` it stops when no new entry is left; with it, it waits for more (1 s
    blocking reads) until `limit` alerts were printed or the user interrupts.
    """
    ensure_group(client, stream, group)
    printed = 0
    try:
        while limit is None or printed < limit:
            want = BATCH if limit is None else min(BATCH, limit - printed)
            block = FOLLOW_BLOCK_MS if follow else None
            alerts = read_alerts(client, stream, group, consumer, count=want, block_ms=block)
            if not alerts:
                if follow:
                    continue
                break
            for entry_id, fields in alerts:
                line = alert_json(entry_id, fields) if as_json else format_alert(fields)
                out.write(line + "\n")
            out.flush()
            ack(client, stream, group, (entry_id for entry_id, _ in alerts))
            printed += len(alerts)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how `--follow` ends (a batch cut before its ACK stays pending)
    return printed
