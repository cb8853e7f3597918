"""Every Prometheus metric of the project, declared once. Labels are bounded: never a card id.

They live in prometheus_client's default registry, which Bytewax's API server exposes on
`/metrics` when `BYTEWAX_DATAFLOW_API_ENABLED=1`; `serve(port)` exposes it on a port of our own.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from features.events import CONTROL_COMMANDS, REASONS

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

TRANSACTIONS = Counter("fraud_transactions", "Transactions scored.")
LABELS = Counter("fraud_labels", "Labels joined to their transaction.", ["is_fraud"])
ALERTS = Counter("fraud_alerts", "Alerts emitted (final score at or above the threshold).")
DEAD_LETTERS = Counter("fraud_dead_letters", "Records sent to the dead-letter stream.", ["kind", "reason"])
LATE_EVENTS = Counter(
    "fraud_late_events", "Transactions older than the allowed lateness for one of their keys."
)
UNEXPLAINED_ALERTS = Counter(
    "fraud_unexplained_alerts", "Alerts sent without reasons because computing them failed."
)
ONLINE_LEARNED = Counter(
    "fraud_online_labels_learned",
    "Labels the online model learned from (every scorer replica learns each label).",
)
ONLINE_LEARN_SECONDS = Counter(
    "fraud_online_learn_seconds", "Time River spent learning labels, in this process's scorer replicas."
)

# Seconds per step, in cells the hot path adds to in place (a float added to, read at scrape time,
# costs less than a Counter's lock): each ordered step's logic (`fraud_step_seconds`), and its
# `snapshot()` calls at epoch closes (`fraud_snapshot_seconds`: what Bytewax then pickles is not
# counted), the part of the latency tail the epoch closes cause.
STEP_SECONDS: dict[str, list[float]] = {}
SNAPSHOT_SECONDS: dict[str, list[float]] = {}


def observe_all(histogram: Histogram, amounts: Sequence[float]) -> None:
    """`histogram.observe(a)` for every `a` of `amounts`, in one pass: the same bucket counts (each
    amount in the first bucket whose bound is at least it, a NaN in none), the sum of the amounts
    added to the histogram's sum at once (so its last bits can differ from one add per amount),
    one lock round per bucket that gained something instead of two per amount. A prometheus-client
    without the histogram's bucket values it reads observes one by one."""
    if not amounts:
        return
    bounds, buckets = getattr(histogram, "_upper_bounds", None), getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for a in amounts:
            histogram.observe(a)
        return
    histogram._raise_if_not_observable()  # noqa: SLF001 - what `observe` checks first
    counts = [0] * len(bounds)
    added = 0.0
    for a in amounts:
        added += a
        if a == a:  # a NaN is in no bucket (no bound is at least it), as with `observe`
            counts[bisect_left(bounds, a)] += 1
    total.inc(added)
    for bucket, n in zip(buckets, counts, strict=True):
        if n:
            bucket.inc(n)


FRAUD_LABELS = LABELS.labels(is_fraud="true")  # the two children, looked up once
GENUINE_LABELS = LABELS.labels(is_fraud="false")


def step_timer(step: str) -> list[float]:
    """The cell `step` adds its seconds to."""
    return STEP_SECONDS.setdefault(step, [0.0])


def snapshot_timer(step: str) -> list[float]:
    """The cell `step`'s snapshots add their seconds to."""
    return SNAPSHOT_SECONDS.setdefault(step, [0.0])


class _StepCells(Collector):
    """A counter per step, read from `cells` at scrape time."""

    def __init__(self, name: str, doc: str, cells: dict[str, list[float]]) -> None:
        self.name, self.doc, self.cells = name, doc, cells

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.doc, labels=["step"])
        for step, cell in sorted(self.cells.items()):
            family.add_metric([step], cell[0])
        yield family


REGISTRY.register(
    _StepCells(
        "fraud_step_seconds", "Time each step's logic ran in this process (flows.ordering).", STEP_SECONDS
    )
)
REGISTRY.register(
    _StepCells(
        "fraud_snapshot_seconds",
        "Time each step's state snapshots took at epoch closes in this process (flows.ordering).",
        SNAPSHOT_SECONDS,
    )
)
PENDING = Gauge("fraud_pending_transactions", "Scored transactions still waiting for their label.")
ORDER_HELD = Gauge(
    "fraud_order_held_events",
    "Events a step holds until every shard's watermark has passed them (flows.ordering).",
    ["step"],
)
ORDER_LATE = Counter(
    "fraud_order_late_events_total",
    "Events that reached an ordered step behind its watermark (after a shard's idle spell) and "
    "were applied at once, out of the canonical order.",
    ["step"],
)
SCORING_BATCH = Histogram(
    "fraud_scoring_batch_size", "Transactions per vectorised XGBoost call.", buckets=BATCH_BUCKETS
)
SCORING_SECONDS = Histogram(
    "fraud_scoring_batch_seconds",
    "Wall time of one scoring batch (both models).",
    buckets=LATENCY_BUCKETS,
)
LATENCY = Histogram(
    "fraud_end_to_end_latency_seconds",
    "From a record's arrival (its Redis entry id's time; a file's: when read) to its scored decision.",
    buckets=LATENCY_BUCKETS,
)
SCORES = Histogram(
    "fraud_score",
    "Final scores, to watch their distribution drift.",
    buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
)
REDIS_ERRORS = Counter("fraud_redis_errors", "Redis operations that failed and were retried.", ["op"])
REDIS_OPS = ("xread", "xadd", "source_lag")  # the `op` values: the source's reads and lag, the sinks' writes
STREAM_TRIMMED = Counter(
    "fraud_stream_trimmed",
    "Entries removed from an output stream by its age retention (XTRIM MINID), per stream.",
    ["stream"],
)
SINK_DUPLICATES = Counter(
    "fraud_sink_duplicates",
    "Stream entries not written again because their sent marker existed (replays, retried batches).",
    ["stream"],
)
EPOCH_PAUSE = Histogram(
    "fraud_epoch_pause_seconds",
    "Per Redis input shard: how long it went unread after each epoch close. Bytewax polls an "
    "input again only once the closed epoch is through the whole flow and, with recovery, saved "
    "(snapshots, shard-file fsyncs, its recovery store): records arriving meanwhile wait in Redis.",
    buckets=LATENCY_BUCKETS,
)
SOURCE_LAG = Gauge(
    "fraud_source_lag_seconds",
    "Per input shard: stream-id time of the newest entry minus that of the first unread one.",
    ["shard"],
)
FEATURE_PSI = Gauge(
    "fraud_feature_psi",
    'Population stability index of each feature (and of the XGBoost score: feature="score") over '
    "the drift window against the artifact's training rows.",
    ["feature"],
)
MODEL_QUALITY = Gauge(
    "fraud_model_quality",
    "Prequential quality over the last FRAUD_DRIFT_LABEL_WINDOW labels.",
    ["model", "metric"],
)
DRIFT_EVENTS = Counter(
    "fraud_drift_events", "Drift events found (data or concept, drifting or recovered).", ["kind", "state"]
)
MODEL = Info("fraud_model", "The XGBoost artifact being served (version), and the one shadowed.")
RULE_HITS = Counter(
    "fraud_rule_hits",
    "Transactions each rule matched (dry-run rules included: they only count).",
    ["rule", "action", "dry_run"],
)
MODEL_COMMANDS = Counter(
    "fraud_model_commands",
    "Operator commands (champion, shadow, rules) the scorer applied or refused, per replica.",
    ["command", "result"],
)
FEATURE_ENGINE = Info(
    "fraud_feature_engine",
    "How window features are computed: kernel compiled (features/_kernel.c) or python.",
)


def init_labels() -> None:
    """Create every bounded label combination at 0 so dashboards see the series before any event."""
    for kind in ("txn", "label", "control"):
        for reason in REASONS:
            DEAD_LETTERS.labels(kind=kind, reason=reason)
    for v in ("true", "false"):
        LABELS.labels(is_fraud=v)
    for kind in ("data", "concept"):
        for state in ("drifting", "recovered"):
            DRIFT_EVENTS.labels(kind=kind, state=state)
    for command in CONTROL_COMMANDS:
        for result in ("applied", "refused"):
            MODEL_COMMANDS.labels(command=command, result=result)
    for op in REDIS_OPS:
        REDIS_ERRORS.labels(op=op)


def serve(port: int) -> None:
    """Expose the default registry on http://0.0.0.0:`port`/metrics (in a daemon thread)."""
    start_http_server(port)
