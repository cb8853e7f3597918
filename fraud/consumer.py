"""Reading alerts back from the Redis stream, for `fraud alerts`.

Alerts are consumed through a consumer group so several terminals (or a later run of the
command) share the work and each alert is shown once per group. An entry is acknowledged only
once its line was written and flushed, one by one, so a run cut short (Ctrl-C, a crash, `| head`
closing the pipe, a failing terminal) leaves exactly the entries it did not show pending. Each
run therefore reads, in this order:

1. its own pending entries (`XREADGROUP … 0`, paging until none is left): what an interrupted
   earlier run of the same consumer name had read but not shown;
2. entries of other consumers of the group idle for `claim_idle_ms` (`XAUTOCLAIM`, one pass over
   the group's pending list; default 5 minutes): a consumer that died, or whose name is never
   used again, would otherwise hold its entries forever. A live `fraud alerts` acknowledges
   within milliseconds of reading, so an entry idle that long was abandoned; the price is that a
   reader stuck for minutes on a blocked output may see its entries shown by a peer as well
   (at-least-once). With `--follow` the pass is repeated whenever the stream is idle;
3. new entries (`>`).

Pending entries whose stream entry was deleted meanwhile (XDEL, MAXLEN trimming) cannot be shown
and are acknowledged silently. Nothing in an entry can stop the reader: values are decoded with
invalid UTF-8 escaped, text lines escape control characters and cap each field (`fraud.display`),
a missing or unparseable part shows as `?`, and a line that still fails to format is replaced by a
placeholder, because an entry that raised would stay pending and stall every later run at step 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import redis

from fraud.display import FIELD_CAP, UNKNOWN, cap, decode, escape, loads, show, write_line

FOLLOW_BLOCK_MS = 1000
BATCH = 100
CLAIM_IDLE_MS = 5 * 60 * 1000
SCAN_PAGE = 1000

Alert = tuple[str, dict[str, str]]

__all__ = [
    "BATCH",
    "CLAIM_IDLE_MS",
    "UNKNOWN",
    "Alert",
    "ack",
    "alert_json",
    "consume",
    "ensure_group",
    "format_alert",
    "parse_reasons",
    "pending_count",
    "read_alerts",
    "scan_stream",
    "stream_length",
]


def ensure_group(client: redis.Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """Create `group` on `stream` (and the stream itself); False if the group already existed."""
    try:
        client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True


def _fields(raw: Any) -> dict[str, str]:
    return {decode(k): decode(v) for k, v in (raw or {}).items()}


def _entries(response: Any) -> list[tuple[str, Any]]:
    """`(id, raw fields)` pairs of an XREADGROUP answer, whatever the protocol's shape."""
    if not response:
        return []
    if isinstance(response, dict):  # RESP3: {stream: entries} (older redis-py: {stream: [entries]})
        batches = [v[0] if v and isinstance(v[0], list) else v for v in response.values()]
    else:  # RESP2: [[stream, entries]]
        batches = [entries for _, entries in response]
    return [(decode(entry_id), fields) for entries in batches for entry_id, fields in entries or []]


def _read(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    start_id: str,
    count: int,
    block_ms: int | None,
) -> tuple[list[Alert], list[str], str | None]:
    """One XREADGROUP: (entries with content, ids whose entry is gone, the last id returned).

    Only a read of the pending list (`start_id` other than `>`) can return a gone entry: Redis
    answers its id with no fields, which a real entry never has (XADD needs one field).
    """
    response: Any = client.xreadgroup(group, consumer, {stream: start_id}, count=count, block=block_ms)
    alerts: list[Alert] = []
    gone: list[str] = []
    entries = _entries(response)
    for entry_id, fields in entries:
        if fields:
            alerts.append((entry_id, _fields(fields)))
        else:
            gone.append(entry_id)
    return alerts, gone, entries[-1][0] if entries else None


def read_alerts(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    count: int = BATCH,
    block_ms: int | None = None,
    start_id: str = ">",
) -> list[Alert]:
    """Up to `count` entries as `(id, fields)` with str values (invalid UTF-8 as `\\xNN`).

    `start_id=">"` reads entries never delivered to `group`; an id (e.g. "0") re-reads this
    consumer's pending entries after it, skipping those deleted from the stream meanwhile.
    `block_ms=None` returns at once (possibly nothing); otherwise waits up to that long.
    """
    return _read(client, stream, group, consumer, start_id, count, block_ms)[0]


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
    """The `reasons` field decoded from JSON, or None when missing, malformed, too deep or not a list."""
    if raw is None:
        return None
    try:
        reasons = loads(raw)
    except ValueError:
        return None
    return reasons if isinstance(reasons, list) else None


def _num(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return UNKNOWN
    try:
        return format(float(value), spec)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float's range
        return UNKNOWN


def _name(value: Any) -> str:
    """A reason's feature name: only a non-empty string is one (a nested list could be anything)."""
    return show(value) if isinstance(value, str) and value else UNKNOWN


def _reason(item: Any) -> str:
    if not isinstance(item, dict):
        return UNKNOWN
    if "rule" in item:
        return f"rule {_name(item.get('rule'))} ({_name(item.get('action'))})"
    value = item.get("value", UNKNOWN)
    shown = "na" if value is None else _num(value, ".4g")
    return f"{_name(item.get('feature'))}={shown} ({_num(item.get('contribution'), '+.3f')})"


def _reasons_text(raw: str | None) -> str:
    """The reasons as `feature=value (contribution), …`, stopping once `FIELD_CAP` is passed."""
    reasons = parse_reasons(raw)
    if reasons is None:
        return UNKNOWN
    if not reasons:
        return "none"
    parts: list[str] = []
    size = 0
    for item in reasons:
        if size > FIELD_CAP:
            return ", ".join(parts) + f"… ({len(reasons) - len(parts)} more reasons)"
        part = _reason(item)
        parts.append(part)
        size += len(part) + 2
    return ", ".join(parts)


def _action(fields: Mapping[str, str]) -> str:
    """`  action=review` for an alert a rule sent to review (plain alerts say nothing more)."""
    action = fields.get("action")
    return f"  action={show(action)}" if action and action != "alert" else ""


def format_alert(fields: Mapping[str, str]) -> str:
    """One line for an alert entry: escaped, each field capped, missing or malformed parts as `?`."""

    def get(key: str) -> str:
        return show(fields.get(key))

    return (
        f"{get('ts')}  txn={get('txn_id')}  card={get('card_id')}  merchant={get('merchant_id')}  "
        f"score={_num(fields.get('score'))} (xgb {_num(fields.get('xgb_score'))}, "
        f"online {_num(fields.get('online_score'))}; threshold {_num(fields.get('threshold'))})  "
        f"model={get('model_version')}{_action(fields)}  reasons: {_reasons_text(fields.get('reasons'))}"
    )


def _dumps(doc: Any) -> str:
    # ensure_ascii: every control character and non-ASCII one is written as \uNNNN, so the line is
    # safe on a terminal and complete; allow_nan=False: NaN/Infinity are not JSON.
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def alert_json(entry_id: str, fields: Mapping[str, str]) -> str:
    """One JSON object: the entry id and its complete fields, `reasons` decoded when valid JSON.

    `reasons` stays the raw string when it does not decode to a list, or when the decoded value
    cannot be written back as strict JSON (NaN, or nesting deep enough to exhaust the encoder).
    """
    body: dict[str, Any] = dict(fields)
    parsed = parse_reasons(body.get("reasons"))
    if parsed is not None:
        try:
            return _dumps({"id": entry_id, "fields": {**body, "reasons": parsed}})
        except (ValueError, RecursionError, TypeError):
            pass
    return _dumps({"id": entry_id, "fields": body})


def _render(entry_id: str, fields: Mapping[str, str], as_json: bool) -> str:
    """The entry's line; a formatting bug shows a placeholder instead of stalling the group."""
    try:
        return alert_json(entry_id, fields) if as_json else format_alert(fields)
    except Exception as exc:  # never expected; an entry that raised would be re-delivered forever
        note = f"unprintable entry ({type(exc).__name__})"
        return _dumps({"id": entry_id, "error": note}) if as_json else f"{escape(cap(entry_id))}  {note}"


@dataclass
class _Batch:
    alerts: list[Alert]
    gone: list[str] = field(default_factory=list)  # pending ids whose entry was deleted: ack only


@dataclass
class _GroupReader:
    """Where the next batch comes from: own pending list, then idle ones claimed, then new."""

    client: redis.Redis
    stream: str
    group: str
    consumer: str
    claim_idle_ms: int | None
    pending_from: str | None = "0"  # None once this consumer's pending list was read through
    claim_cursor: str = "0-0"
    claim_pass_done: bool = False

    def next_batch(self, count: int, block_ms: int | None) -> _Batch | None:
        """Up to `count` entries to show; None when nothing is left (after waiting `block_ms`)."""
        while True:
            if self.pending_from is not None:
                alerts, gone, last = _read(
                    self.client, self.stream, self.group, self.consumer, self.pending_from, count, None
                )
                if last is not None:
                    # Paging by the last id (not always "0") keeps a batch that could not be
                    # acknowledged from being read again in this run.
                    self.pending_from = last
                    return _Batch(alerts, gone)
                self.pending_from = None
            if self.claim_idle_ms is not None and not self.claim_pass_done:
                batch = self._claim(count)
                if batch is not None:
                    return batch
                continue
            alerts, _, _ = _read(self.client, self.stream, self.group, self.consumer, ">", count, block_ms)
            if alerts:
                return _Batch(alerts)
            if block_ms is not None:
                self.claim_pass_done = False  # following an idle stream: look for abandoned ones again
            return None

    def _claim(self, count: int) -> _Batch | None:
        """One XAUTOCLAIM step of the pass over the group's pending list."""
        try:
            response: Any = self.client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self.claim_idle_ms or 0,
                self.claim_cursor,
                count=count,
            )
        except redis.ResponseError as exc:
            if "unknown command" not in str(exc).lower():
                raise
            self.claim_idle_ms = None  # Redis before 6.2 has no XAUTOCLAIM: own pending and new only
            return None
        self.claim_cursor = decode(response[0])
        self.claim_pass_done = self.claim_cursor == "0-0"
        alerts: list[Alert] = []
        for entry_id, fields in response[1] or []:
            if entry_id is None or not fields:
                # Redis 6.2 claims a deleted entry without naming it: it is now ours, and reading
                # our pending list again finds (and acknowledges) it.
                self.pending_from = "0"
            else:
                alerts.append((decode(entry_id), _fields(fields)))
        return _Batch(alerts) if alerts else None


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
    claim_idle_ms: int | None = CLAIM_IDLE_MS,
) -> int:
    """Print this consumer's pending alerts, idle ones claimed, then new ones; return how many.

    Each line is flushed before its entry counts as shown, and exactly the shown entries are
    acknowledged, also when the output fails midway (the error is then raised: BrokenPipeError
    for a closed pipe) or Ctrl-C stops the run. Without `follow` it stops when nothing is left;
    with it, it waits for more (1 s blocking reads) until `limit` alerts were printed or the user
    interrupts. `claim_idle_ms=None` claims nothing from other consumers.
    """
    ensure_group(client, stream, group)
    reader = _GroupReader(client, stream, group, consumer, claim_idle_ms)
    printed = 0
    try:
        while limit is None or printed < limit:
            want = BATCH if limit is None else min(BATCH, limit - printed)
            batch = reader.next_batch(want, FOLLOW_BLOCK_MS if follow else None)
            if batch is None:
                if follow:
                    continue
                break
            shown = list(batch.gone)
            try:
                for entry_id, fields in batch.alerts:
                    write_line(out, _render(entry_id, fields, as_json))
                    shown.append(entry_id)
                    printed += 1
            finally:
                ack(client, stream, group, shown)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how `--follow` ends; what was not shown stays pending for the next run
    return printed


def scan_stream(
    client: redis.Redis, stream: str, page: int = SCAN_PAGE
) -> Iterator[tuple[str, dict[Any, Any]]]:
    """Every entry of `stream` in id order as `(id, raw fields)`, read `page` entries per XRANGE.

    One XRANGE of a stream of millions would build the whole answer in the server's and this
    process's memory at once. Each page starts just after the last id seen (`<ms>-<seq+1>`, which
    works on every Redis, unlike the `(` exclusive range of 6.2); fields stay raw so a caller that
    needs one of them does not decode megabytes of the others.
    """
    start = "-"
    while True:
        entries: Any = client.xrange(stream, min=start, max="+", count=page)
        for entry_id, fields in entries or []:
            yield decode(entry_id), fields or {}
        if not entries or len(entries) < page:
            return
        ms, seq = (int(part) for part in decode(entries[-1][0]).partition("-")[::2])
        start = f"{ms}-{seq + 1}" if seq < 2**64 - 1 else f"{ms + 1}-0"
