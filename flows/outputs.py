"""What leaves the flow: alert, decision and dead-letter stream entries, metrics, progress lines.

Card ids are written as the transaction carries them: with a token key, the decoder already
replaced them by tokens (`flows.steps.decoder`), so no entry here can hold a raw one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import resource
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from prometheus_client import REGISTRY

from features.events import DeadLetter, payload_bytes
from models.drift import DriftEvent
from models.serving import Decision
from service import telemetry

_failure: list[str] = []


class LatencySketch:
    """Every latency of a run in bounded memory: counts per logarithmic bucket, each bucket at most
    1 % wide (relative), so every quantile is within 1 % of the exact one, however long the run.
    Mergeable (`merge` adds the counts), like the Prometheus histogram but finer than its buckets."""

    ALPHA = 0.005  # half a bucket's relative width: quantiles within 2 * ALPHA of the exact value
    GAMMA = (1 + ALPHA) / (1 - ALPHA)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.zeros = 0  # latencies of 0 (or below: a clock step)
        self.n = 0
        self._log_gamma = math.log(self.GAMMA)

    def add(self, seconds: float) -> None:
        self.n += 1
        if seconds <= 0:
            self.zeros += 1
            return
        k = math.ceil(math.log(seconds) / self._log_gamma)
        self.counts[k] = self.counts.get(k, 0) + 1

    def merge(self, other: LatencySketch) -> None:
        self.n += other.n
        self.zeros += other.zeros
        for k, c in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + c

    def quantile(self, q: float) -> float:
        """The value below which a share `q` of the latencies lie (the bucket's midpoint)."""
        if self.n == 0:
            return math.nan
        rank = q * (self.n - 1)
        seen = self.zeros
        if rank < seen:
            return 0.0
        for k in sorted(self.counts):
            seen += self.counts[k]
            if rank < seen:
                return 2 * self.GAMMA**k / (self.GAMMA + 1)
        return 2 * self.GAMMA ** max(self.counts) / (self.GAMMA + 1)


# How long each Redis input partition of this process went unread after an epoch close
# (`flows.redis_source`; the `fraud_epoch_pause_seconds` histogram, finer): the summary prints it.
EPOCH_PAUSES = LatencySketch()


def mark_failed(why: str) -> None:
    """Record that the flow is stopping on an error (a sink or source that gave up), so that the
    progress summary says `[stopped]` with why instead of `[done]`."""
    _failure.append(why)


def rfc3339(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds")


def _reasons_json(d: Decision) -> str:
    """The rules that matched (dry-run ones aside), then the model's top contributions, as a JSON
    list (NaN feature values as null)."""
    rules: list[dict[str, object]] = [{"rule": h.rule, "action": h.action} for h in d.hits if not h.dry_run]
    reasons = rules + [
        {
            "feature": name,
            "value": None if value != value else round(value, 4),
            "contribution": round(c, 4),
        }
        for name, value, c in d.reasons
    ]
    return json.dumps(reasons)


def score_text(x: float) -> str:
    """A score as written to every stream: full precision (the shortest text that reads back as
    the same float), so an audit or a retraining sees exactly what decided."""
    return repr(float(x))


def _about(d: Decision) -> dict[str, str]:
    """The fields every per-transaction entry starts with: which transaction, whose, when."""
    t = d.txn
    return {
        "txn_id": t.txn_id,
        "card_id": t.card_id,
        "merchant_id": t.merchant_id,
        "ts": rfc3339(t.ts_ms),
    }


def _scores(d: Decision) -> dict[str, str]:
    """Scores, and the model version and threshold that made the decision."""
    return {
        "score": score_text(d.score),
        "xgb_score": score_text(d.xgb),
        "online_score": score_text(d.online),
        "threshold": score_text(d.threshold),
        "model_version": d.version,
        "action": d.action,
    }


def alert_entry(d: Decision) -> dict[str, str] | None:
    """The `fraud:alerts` stream entry of an alerting decision, None for the others."""
    if not d.alert:
        return None
    return {
        **_about(d),
        "ts_ms": str(d.txn.ts_ms),
        "amount": repr(d.txn.amount),
        **_scores(d),
        "reasons": _reasons_json(d),
        "late": "1" if d.late else "0",
        "latency_ms": "" if d.latency_s is None else f"{d.latency_s * 1000:.3f}",
    }


def decision_entry(d: Decision, names: list[str]) -> dict[str, str]:
    """The audit-trail entry of every scored transaction: what was seen, scored and decided, by
    which model version; with a shadow model, what it said (`shadow_*`).

    `features` is a JSON object feature name -> value (non-finite values as null), in the order of
    `names`, the artifact's feature names, which must match the decision's vector.
    """
    features = {
        name: float(value) if math.isfinite(value) else None
        for name, value in zip(names, d.values, strict=True)
    }
    entry = {
        **_about(d),
        **_scores(d),
        "alert": "1" if d.alert else "0",
        "features": json.dumps(features),
        "reasons": _reasons_json(d),
        "late": "1" if d.late else "0",
    }
    if d.hits:  # every rule that matched, dry-run ones too
        entry["rules"] = json.dumps(
            [{"rule": h.rule, "action": h.action, "dry_run": h.dry_run} for h in d.hits]
        )
    if d.shadow is not None:
        entry["shadow_version"] = d.shadow.version
        entry["shadow_xgb_score"] = score_text(d.shadow.xgb)
        entry["shadow_score"] = score_text(d.shadow.score)
        entry["shadow_alert"] = "1" if d.shadow.alert else "0"
    return entry


def late_entry(d: Decision) -> dict[str, str] | None:
    """The `fraud:late` side-output entry of a transaction beyond the allowed lateness, else None."""
    if not d.late:
        return None
    return {
        **_about(d),
        "score": score_text(d.score),
        "alert": "1" if d.alert else "0",
    }


def drift_entry(e: DriftEvent) -> dict[str, str]:
    """The `fraud:drift` stream entry of a drift event: what drifted, by how much, since when."""
    return {
        "id": e.id,
        "kind": e.kind,
        "what": e.what,
        "state": e.state,
        "value": f"{e.value:.6g}",
        "threshold": f"{e.threshold:.6g}",
        "since": iso_ms(e.since_ms),
        "at": iso_ms(e.at_ms),
        "detail": e.detail,
    }


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def dead_letter_id(kind: str, reason: str, raw: str, origin: str = "") -> str:
    """Identity of a dead letter: a replayed one gets the same id, so the sink can skip it.

    With an origin (stream entry id, file line) the same bad payload sent twice is two dead
    letters, and only a replay of the same record after a restart is skipped. Without one (a
    source that cannot say where a record came from) identical payloads share an id. The parts are
    joined with NUL, which none of them but `raw` contains, so that no two different tuples share
    the hashed text.
    """
    text = f"{kind}\0{reason}\0{origin}\0{raw}"
    return hashlib.sha256(text.encode("utf-8", errors="surrogateescape")).hexdigest()[:32]


def dlq_entry(d: DeadLetter) -> dict[str, str | bytes]:
    """The `fraud:dlq` stream entry: the raw payload, byte for byte as received (card ids
    tokenized when a key is set), why it was refused, and its id."""
    return {
        "id": dead_letter_id(d.kind, d.reason, d.raw, d.origin),
        "kind": d.kind,
        "reason": d.reason,
        "detail": payload_bytes(d.detail[:1000]),
        "raw": payload_bytes(d.raw),
        "txn_id": d.txn_id or "",
        "origin": d.origin,
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }


def count_decisions(decisions: list[Decision]) -> None:
    telemetry.TRANSACTIONS.inc(len(decisions))
    alerts = late = 0
    for d in decisions:
        for h in d.hits:
            telemetry.RULE_HITS.labels(
                rule=h.rule, action=h.action, dry_run="true" if h.dry_run else "false"
            ).inc()
        alerts += d.alert
        late += d.late
    if alerts:
        telemetry.ALERTS.inc(alerts)
    if late:
        telemetry.LATE_EVENTS.inc(late)
    telemetry.observe_all(telemetry.LATENCY, [d.latency_s for d in decisions if d.latency_s is not None])
    telemetry.observe_all(telemetry.SCORES, [d.score for d in decisions])


def count_dead_letter(d: object) -> DeadLetter:
    """Count a record of the dead-letter branch (typed loosely: Bytewax's branch keeps the union)."""
    assert isinstance(d, DeadLetter), f"not a dead letter: {type(d).__name__}"
    telemetry.DEAD_LETTERS.labels(kind=d.kind, reason=d.reason).inc()
    return d


def _total(name: str) -> float:
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == name:
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def progress_line(elapsed_s: float, prefix: str) -> str:
    txns = _total("fraud_transactions")
    rate = txns / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"{prefix} {txns:,.0f} transactions ({rate:,.0f}/s) · {_total('fraud_alerts'):,.0f} alerts · "
        f"{_total('fraud_dead_letters'):,.0f} dead letters · {_total('fraud_labels'):,.0f} labels · "
        f"{elapsed_s:,.1f}s"
    )


class _ProgressPartition(StatelessSinkPartition[object]):
    def __init__(self, interval_s: float, out: TextIO, label: str) -> None:
        self.interval_s, self.out, self.label = interval_s, out, label
        self.started = self.last = self.last_item = time.monotonic()
        self.latency = LatencySketch()
        self.decided = 0
        self.marks: list[tuple[float, int]] = [(0.0, 0)]  # (seconds, decisions so far), one a second at most

    def write_batch(self, items: list[object]) -> None:
        add = self.latency.add
        for d in items:
            if type(d) is Decision:
                self.decided += 1
                if d.latency_s is not None:
                    add(d.latency_s)
        now = time.monotonic()
        if items:
            self.last_item = now
            if now - self.started - self.marks[-1][0] >= 1.0:
                self.marks.append((now - self.started, self.decided))
        if now - self.last >= self.interval_s:
            self.last = now
            self._print(progress_line(now - self.started, f"[progress{self.label}]"))

    def close(self) -> None:
        # The rate counts until the last record: a Redis source may idle a while before it stops.
        tag = f"[stopped{self.label}]" if _failure else f"[done{self.label}]"
        self._print(progress_line(self.last_item - self.started, tag))
        if _failure:
            self._print(f"{tag} on error: {_failure[0]}")
            return
        sketch = self.latency
        if sketch.n >= 2:
            p50, p95, p99, p999 = (sketch.quantile(q) * 1000 for q in (0.5, 0.95, 0.99, 0.999))
            self._print(
                f"{tag} arrival-to-decision latency: p50 {p50:.1f} ms · p95 {p95:.1f} ms · "
                f"p99 {p99:.1f} ms · p99.9 {p999:.1f} ms (every one of {sketch.n:,} transactions, "
                "within 1 %)"
            )
        phases = throughput_by_tenth([*self.marks, (self.last_item - self.started, self.decided)])
        if phases:
            self._print(
                f"{tag} throughput by tenth of the transactions: "
                + " · ".join(f"{r:,.0f}" for r in phases)
                + " /s"
            )
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._print(
            f"{tag} process CPU {usage.ru_utime + usage.ru_stime:,.1f} s "
            f"(user {usage.ru_utime:,.1f} s, system {usage.ru_stime:,.1f} s)"
        )
        snaps = sorted(
            ((c[0], step) for step, c in telemetry.SNAPSHOT_SECONDS.items() if c[0] > 0), reverse=True
        )
        if snaps:
            self._print(
                f"{tag} state snapshots at epoch closes: {sum(t for t, _ in snaps):,.2f} s in this process ("
                + ", ".join(f"{step} {t:,.2f} s" for t, step in snaps[:5])
                + ")"
            )
        pauses = EPOCH_PAUSES
        if pauses.n:
            p50, p90, top = (pauses.quantile(q) * 1000 for q in (0.5, 0.9, 1.0))
            self._print(
                f"{tag} input paused at epoch closes: p50 {p50:.1f} ms · p90 {p90:.1f} ms · max "
                f"{top:.1f} ms ({pauses.n:,} closes × Redis partitions)"
            )

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def throughput_by_tenth(marks: list[tuple[float, int]]) -> list[float]:
    """Decisions per second over each tenth of a run's decisions, from (seconds, decisions so far)
    marks (interpolated between marks); [] for a run too short or too small to split."""
    total = marks[-1][1]
    if total < 10 or len(marks) < 3:
        return []

    def time_at(count: float) -> float:
        for (t0, n0), (t1, n1) in itertools.pairwise(marks):
            if n1 >= count:
                return t0 + (t1 - t0) * ((count - n0) / (n1 - n0) if n1 > n0 else 1.0)
        return marks[-1][0]

    edges = [time_at(total * k / 10) for k in range(11)]
    return [total / 10 / (b - a) if b > a else math.inf for a, b in itertools.pairwise(edges)]


class ProgressSink(DynamicSink[object]):
    """Prints processed / rate / alerts / dead letters every `interval_s`, and a summary at the end."""

    def __init__(self, interval_s: float, out: TextIO | None = None) -> None:
        self.interval_s, self.out = interval_s, out  # None: sys.stdout as it is when the flow runs

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ProgressPartition:
        label = f" w{worker_index}" if worker_count > 1 else ""
        return _ProgressPartition(self.interval_s, self.out or sys.stdout, label)
