"""`fraud report`: one self-contained HTML file of charts about how the models did.

Two sources, one report:

- a replay of files through the serving scorer (`fraud.train.scored_batches`, as `fraud evaluate`
  replays them): XGBoost's, River's and the final score of every transaction, the alerts and
  their reasons; the generator's fraud pattern of each fraud when the transactions file names it;
- the decision log the flow wrote (`FRAUD_DECISION_LOG=1`, `FRAUD_DECISION_STREAM`), read in
  pages, with its labels from a file or else from the input shard streams (as
  `fraud evaluate --from-decisions` reads them), and the alerts stream's latencies.

Every quality number is judged by `fraud evaluate`'s rules (`fraud.dataset.Dataset`): labelled
transactions only, without those of cards whose fraud label had already arrived before that day
(they are blocked already). Days are counted from the first transaction's UTC day, as the
training protocol counts them.

The file embeds plotly.js once, inline (about 4.8 MB), so it opens offline; each chart carries
its data, curves thinned to at most `MAX_CURVE_POINTS` points and histograms binned here, so the
file stays a few hundred kB on top of plotly.js whatever the number of transactions.
"""

from __future__ import annotations

import html
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from models import evaluation

if TYPE_CHECKING:
    import redis

    from service.settings import Settings

MAX_CURVE_POINTS = 2000
TOP_REASONS = 20
SCORE_FLOOR = 1e-4  # the score histogram's lowest bin edge (log axis); lower scores count in it
MODELS = ("xgboost", "river", "final")
MODEL_NAMES = {"xgboost": "XGBoost", "river": "River (online)", "final": "Final (combined)"}
COLORS = {"xgboost": "#1f77b4", "river": "#2ca02c", "final": "#d62728"}
NOT_NAMED = "not named by this data"


# --- what the charts are drawn from ------------------------------------------------------------


@dataclass
class Scored:
    """Every scored transaction of one source (one row each, in the order read)."""

    source: str
    txn_ids: list[str]
    ts_ms: np.ndarray  # int64 event time
    cards: list[str]
    scores: dict[str, np.ndarray]  # MODELS -> float64 scores
    alert: np.ndarray  # bool: what was decided (rules included)
    threshold: np.ndarray  # float64: the threshold each decision was made at
    reasons: Counter[str] = field(default_factory=Counter)  # features and rules named by alerts
    latency_ms: np.ndarray = field(default_factory=lambda: np.empty(0))
    latency_about: str = ""
    versions: Counter[str] = field(default_factory=Counter)
    facts: dict[str, str] = field(default_factory=dict)  # shown in the header table

    def __len__(self) -> int:
        return len(self.txn_ids)


def _plot_text(text: str, limit: int = 80) -> str:
    """A name from the data, safe as plotly text (which reads a few HTML tags and entities)."""
    from fraud.display import show

    return show(text, limit).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _reason_names(reasons: Iterable[Any]) -> Iterable[str]:
    """The feature or rule each reason of an alert names (`flows.outputs._reasons_json`'s items)."""
    for item in reasons:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("rule"), str):
            yield f"rule: {item['rule']}"
        elif isinstance(item.get("feature"), str):
            yield item["feature"]


def replay_scored(settings: Settings, transactions: Path, labels: Path | None, *, batch: int = 256) -> Scored:
    """Replay the files through the serving scorer (FRAUD_MODEL_PATH's model, River learning each
    label when it arrives), as `fraud evaluate` does. A file replay has no arrival clock, so the
    latency kept is the processing time of each batch (decoding, features, both models, reasons)
    divided by its transactions."""
    from fraud.train import scored_batches
    from service.runtime import load_model, new_pipeline, new_scorer

    pipeline = new_pipeline(settings)
    artifact = load_model(settings, pipeline)
    scorer = new_scorer(settings, artifact)
    ids: list[str] = []
    ts: list[int] = []
    cards: list[str] = []
    cols: list[tuple[float, float, float, bool, float]] = []
    reasons: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    measured: list[float] = []  # decisions' own latency_s, when the events carried an arrival time
    amortised: list[tuple[float, int]] = []
    batches = scored_batches(scorer, pipeline, transactions, labels, settings.label_ttl_days, batch)
    while True:
        started = time.perf_counter()
        decisions = next(batches, None)
        spent = time.perf_counter() - started
        if decisions is None:
            break
        if scorer.last.failed:  # a report that left transactions out would misreport quality
            item, exc = scorer.last.failed[0]
            raise RuntimeError(f"scoring failed on {item!r:.200}: {type(exc).__name__}: {exc}") from exc
        if decisions:
            amortised.append((spent / len(decisions), len(decisions)))
        for d in decisions:
            ids.append(d.txn.txn_id)
            ts.append(d.txn.ts_ms)
            cards.append(d.txn.card_id)
            cols.append((d.xgb, d.online, d.score, d.alert, d.threshold))
            versions[d.version] += 1
            if d.latency_s is not None:
                measured.append(d.latency_s * 1000)
            if d.alert:
                reasons.update(f"rule: {h.rule}" for h in d.hits if not h.dry_run)
                reasons.update(name for name, _, _ in d.reasons)
    table = np.asarray(cols, dtype=np.float64).reshape(len(cols), 5)
    if measured:
        latency, about = np.asarray(measured), "arrival to decision (the decisions' latency_s)"
    else:
        latency = np.repeat([a for a, _ in amortised], [n for _, n in amortised]).astype(np.float64) * 1000
        about = (
            f"replay of files: processing time per transaction (each batch of {batch} timed from "
            "reading the file to its decisions, divided by its size); files carry no arrival time, "
            "so this is not the flow's arrival-to-decision latency"
        )
    return Scored(
        source=f"replay of {transactions} through the serving scorer",
        txn_ids=ids,
        ts_ms=np.asarray(ts, dtype=np.int64),
        cards=cards,
        scores={"xgboost": table[:, 0], "river": table[:, 1], "final": table[:, 2]},
        alert=table[:, 3].astype(bool),
        threshold=table[:, 4],
        reasons=reasons,
        latency_ms=latency,
        latency_about=about,
        versions=versions,
        facts={
            "model": str(settings.model_path),
            "online weight": f"{scorer.weight:g}",
            "labels River learned": str(scorer.online.n_learned),
        },
    )


def decisions_scored(
    client: redis.Redis, settings: Settings, *, stream: str | None = None, page: int = 1000
) -> Scored:
    """The decision log (`stream`, default FRAUD_DECISION_STREAM), read `page` entries at a time
    (the `features` field is never decoded); a transaction logged twice keeps its first entry.
    Latencies from the alerts stream (FRAUD_ALERTS_STREAM, `latency_ms`). Raises
    `DecisionLogError` when the log is empty or an entry cannot be read."""
    from fraud.consumer import parse_reasons, scan_stream
    from fraud.decision_log import DecisionLogError, parse_ts_ms
    from fraud.display import decode, show

    stream = stream or settings.decision_stream
    seen: set[str] = set()
    ids: list[str] = []
    ts: list[int] = []
    cards: list[str] = []
    cols: list[tuple[float, float, float, bool, float]] = []
    reasons: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    entries = 0
    for entry_id, raw in scan_stream(client, stream, page):
        entries += 1
        f = {decode(k): v for k, v in raw.items() if k not in (b"features", "features")}
        try:
            txn_id = decode(f["txn_id"])
            if txn_id in seen:
                continue
            scores = [float(decode(f[name])) for name in ("xgb_score", "online_score", "score", "threshold")]
            if not all(math.isfinite(v) for v in scores[:3]):
                raise ValueError(f"a score is not a finite number: {scores[:3]}")
            at, card, alert = (
                parse_ts_ms(decode(f["ts"])),
                decode(f["card_id"] if "card_id" in f else f["card"]),
                decode(f["alert"]) == "1",
            )
        except KeyError as exc:
            raise DecisionLogError(
                f"decision {entry_id} in {stream!r} has no {exc.args[0]!r} field"
            ) from None
        except ValueError as exc:
            raise DecisionLogError(
                f"decision {entry_id} in {stream!r}: cannot read {show(str(exc), 200)}"
            ) from None
        seen.add(txn_id)
        ids.append(txn_id)
        ts.append(at)
        cards.append(card)
        cols.append((scores[0], scores[1], scores[2], alert, scores[3]))
        versions[decode(f.get("model_version", b""))] += 1
        if alert:
            reasons.update(_reason_names(parse_reasons(decode(f.get("reasons", b"[]"))) or []))
    if not ids:
        raise DecisionLogError(
            f"the decision stream {stream!r} is empty: run the flow with FRAUD_DECISION_LOG=1 "
            "(FRAUD_DECISION_STREAM names the stream) before reporting on it"
        )
    latency: list[float] = []
    alerts = 0
    for _, raw in scan_stream(client, settings.alerts_stream, page):
        alerts += 1
        try:
            ms = float(decode(raw.get(b"latency_ms", b"")))
        except ValueError:
            continue
        if math.isfinite(ms) and ms >= 0:
            latency.append(ms)
    table = np.asarray(cols, dtype=np.float64).reshape(len(cols), 5)
    return Scored(
        source=f"decision log {stream} ({entries} entries, {len(ids)} transactions)",
        txn_ids=ids,
        ts_ms=np.asarray(ts, dtype=np.int64),
        cards=cards,
        scores={"xgboost": table[:, 0], "river": table[:, 1], "final": table[:, 2]},
        alert=table[:, 3].astype(bool),
        threshold=table[:, 4],
        reasons=reasons,
        latency_ms=np.asarray(latency, dtype=np.float64),
        latency_about=(
            f"arrival to decision, from the `latency_ms` of the {len(latency)} alert(s) now in "
            f"{settings.alerts_stream} ({alerts} entries; alerts only, and only what the stream still keeps)"
        ),
        versions=versions,
    )


# --- the numbers behind the charts ---------------------------------------------------------------


def thin(n: int, max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    """At most `max_points` indices of `range(n)`, evenly spread, the first and last included."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


@dataclass(frozen=True)
class Curves:
    fpr: np.ndarray
    tpr: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    auc: float
    ap: float


def curves(y: np.ndarray, s: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> Curves | None:
    """ROC and precision-recall curves of scores `s` against labels `y` (one point per distinct
    score, thinned to `max_points`), with ROC AUC and average precision (`models.evaluation`);
    None without both classes."""
    yb = np.asarray(y).astype(bool)
    sf = np.asarray(s, dtype=np.float64)
    pos = int(yb.sum())
    neg = yb.size - pos
    if not pos or not neg:
        return None
    order = np.argsort(-sf, kind="stable")
    ss, ys = sf[order], yb[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), ss.size - 1]  # each group of equal scores counts once
    tps = np.cumsum(ys, dtype=np.int64)[last]
    fps = (last + 1) - tps
    fpr, tpr = np.r_[0, fps] / neg, np.r_[0, tps] / pos
    recall, precision = tps / pos, tps / (tps + fps)
    roc, pr = thin(fpr.size, max_points), thin(recall.size, max_points)
    return Curves(
        fpr[roc],
        tpr[roc],
        recall[pr],
        precision[pr],
        evaluation.roc_auc(yb, sf),
        evaluation.average_precision(yb, sf),
    )


def day_range(day: np.ndarray) -> np.ndarray:
    """Every day from the first to the last of `day` (empty days included)."""
    return np.arange(int(day.min()), int(day.max()) + 1) if day.size else np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class DailyAlerts:
    days: np.ndarray
    alerts: np.ndarray  # every alert of the day
    judged: np.ndarray  # alerts judged (labelled, the card not known compromised)
    frauds: np.ndarray  # judged alerts that were fraud
    precision: np.ndarray  # frauds / judged, NaN without judged alerts


def daily_alerts(day: np.ndarray, alert: np.ndarray, judged: np.ndarray, y: np.ndarray) -> DailyAlerts:
    """Alerts per day, and the precision of those that can be judged."""
    days = day_range(day)
    lo, n = (int(days[0]), days.size) if days.size else (0, 0)

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(day[mask] - lo, minlength=n)[:n] if n else np.empty(0, dtype=np.int64)

    alerts, judged_alerts = count(alert), count(alert & judged)
    frauds = count(alert & judged & (y == 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(judged_alerts > 0, frauds / np.maximum(judged_alerts, 1), np.nan)
    return DailyAlerts(days, alerts, judged_alerts, frauds, precision)


def daily_card_precision(
    day: np.ndarray, cards: np.ndarray, y: np.ndarray, s: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Card Precision@k of each day present (`models.evaluation.card_precision_at_k` on that day's
    rows: the k highest-scored cards, each card's highest score, divided by k)."""
    days = np.unique(day)
    values = np.array(
        [evaluation.card_precision_at_k(day[m], cards[m], y[m], s[m], k) for m in (day == d for d in days)],
        dtype=np.float64,
    )
    return days, values


def recall_by_pattern(
    pattern_of: np.ndarray, frauds: np.ndarray, caught: Mapping[str, np.ndarray]
) -> dict[str, dict[str, tuple[int, int]]]:
    """Pattern -> model -> (caught, frauds) over the `frauds` rows whose pattern is named."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for p in sorted(set(pattern_of[frauds].tolist()) - {""}):
        rows = frauds & (pattern_of == p)
        out[p] = {m: (int((c & rows).sum()), int(rows.sum())) for m, c in caught.items()}
    return out


def trailing_recall(
    day: np.ndarray, frauds: np.ndarray, caught: np.ndarray, days: np.ndarray, window: int
) -> np.ndarray:
    """Recall over the `window` days ending on each of `days` (NaN without a fraud in them)."""
    out = np.full(days.size, np.nan)
    for i, d in enumerate(days):
        rows = frauds & (day > d - window) & (day <= d)
        if rows.any():
            out[i] = (caught & rows).sum() / rows.sum()
    return out


def log_histogram(values: np.ndarray, lo: float, hi: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of `values` in `bins` log-spaced bins from `lo` to `hi` (values outside counted in
    the first or last bin); the edges."""
    edges = np.geomspace(lo, hi, bins + 1)
    clipped = np.clip(values, lo, hi)
    counts, _ = np.histogram(clipped, edges)
    return counts, edges


# --- the report ---------------------------------------------------------------------------------


@dataclass
class Chart:
    key: str
    title: str
    about: str
    figure: Any  # plotly.graph_objects.Figure


def _nan_to_none(values: Iterable[float]) -> list[float | None]:
    return [None if v is None or not math.isfinite(v) else float(v) for v in values]


def _empty(fig: Any, why: str) -> Any:
    fig.add_annotation(text=why, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"size": 16})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _figure(title: str, **layout: Any) -> Any:
    import plotly.graph_objects as go

    return go.Figure(
        layout={
            "title": {"text": html.escape(title, quote=False)},
            "template": "plotly_white",
            "height": 460,
            "margin": {"t": 60, "b": 60, "l": 70, "r": 30},
            "legend": {"orientation": "h", "y": -0.18},
            **layout,
        }
    )


@dataclass
class Judged:
    """A source's transactions judged by `fraud evaluate`'s rules (`fraud.dataset.Dataset`)."""

    scored: Scored
    y: np.ndarray  # int8: 1 fraud, 0 genuine or no label
    labelled: np.ndarray  # bool: a label arrived (whenever)
    judged: np.ndarray  # bool: labelled, and the card not known compromised before that day
    day: np.ndarray  # int64: days since the first transaction's UTC day
    day0_ms: int
    pattern_of: np.ndarray  # the generator's pattern of each transaction, "" where not named
    summary: dict[str, str] = field(default_factory=dict)  # facts the charts found, for the header

    @classmethod
    def of(
        cls, scored: Scored, labels: Mapping[str, tuple[bool, int]], patterns: Mapping[str, str]
    ) -> Judged:
        from fraud.dataset import Dataset

        ids = scored.txn_ids
        data = Dataset.of(np.empty((len(ids), 0)), scored.ts_ms.tolist(), ids, scored.cards, dict(labels))
        return cls(
            scored,
            (data.y == 1).astype(np.int8),
            data.y >= 0,
            (data.y >= 0) & ~data.known_compromised,
            data.day.astype(np.int64),
            data.day0_ms,
            np.array([patterns.get(t, "") for t in ids], dtype=object),
        )

    @property
    def frauds(self) -> np.ndarray:
        return self.judged & (self.y == 1)

    @property
    def caught(self) -> dict[str, np.ndarray]:
        """Who caught what: XGBoost alone at the threshold, and the decision that was made."""
        return {"xgboost": self.scored.scores["xgboost"] >= self.scored.threshold, "final": self.scored.alert}

    @property
    def day_axis(self) -> dict[str, Any]:
        start = datetime.fromtimestamp(self.day0_ms / 1000, UTC).date().isoformat()
        return {"title": {"text": f"day (0 = {start}, UTC)"}}


def build_charts(
    scored: Scored,
    labels: Mapping[str, tuple[bool, int]],
    patterns: Mapping[str, str],
    *,
    k: int = 100,
    drift_day: float | None = None,
    window: int = 7,
) -> tuple[list[Chart], dict[str, str]]:
    """The charts of `scored` judged against `labels`, and the header's summary facts."""
    j = Judged.of(scored, labels, patterns)
    j.summary.update(
        {
            "transactions": str(len(scored)),
            "labelled": f"{int(j.labelled.sum())} ({int(j.y.sum())} fraud)",
            "judged": f"{int(j.judged.sum())} ({int(j.frauds.sum())} fraud)",
            "days": str(day_range(j.day).size),
            "threshold": _thresholds(scored.threshold),
            "fraud patterns": ", ".join(sorted(set(j.pattern_of.tolist()) - {""})) or NOT_NAMED,
        }
    )
    charts = [
        *_roc_and_pr(j),
        _score_distribution(j),
        _alerts_per_day(j),
        _card_precision(j, k),
        _pattern_recall(j),
        _adaptation(j, drift_day, window),
        _latency(j),
        _reasons(j),
    ]
    return charts, j.summary


def _roc_and_pr(j: Judged) -> list[Chart]:
    import plotly.graph_objects as go

    roc = _figure(
        "ROC curve per model",
        xaxis={"title": {"text": "false positive rate"}, "range": [0, 1]},
        yaxis={"title": {"text": "true positive rate"}, "range": [0, 1.02]},
    )
    pr = _figure(
        "Precision-recall curve per model",
        xaxis={"title": {"text": "recall"}, "range": [0, 1]},
        yaxis={"title": {"text": "precision"}, "range": [0, 1.02]},
    )
    for m in MODELS:
        c = curves(j.y[j.judged], j.scored.scores[m][j.judged])
        if c is None:
            continue
        line = {"color": COLORS[m]}
        roc.add_trace(
            go.Scatter(x=c.fpr, y=c.tpr, mode="lines", name=f"{MODEL_NAMES[m]} (AUC {c.auc:.3f})", line=line)
        )
        pr.add_trace(
            go.Scatter(
                x=c.recall, y=c.precision, mode="lines", name=f"{MODEL_NAMES[m]} (AP {c.ap:.3f})", line=line
            )
        )
        j.summary[f"{MODEL_NAMES[m]}: ROC AUC / AP"] = f"{c.auc:.3f} / {c.ap:.3f}"
    if roc.data:
        chance = {"dash": "dot", "color": "#aaa"}
        roc.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=chance))
    else:
        _empty(roc, "needs frauds and genuine transactions among the judged ones")
        _empty(pr, "needs frauds and genuine transactions among the judged ones")
    about = (
        f"{int(j.judged.sum())} judged transactions ({int(j.frauds.sum())} frauds): labelled, without "
        "those of cards whose fraud label had already arrived before that day."
    )
    return [
        Chart("roc", "ROC curve per model", about, roc),
        Chart("pr", "Precision-recall curve per model", about, pr),
    ]


def _score_distribution(j: Judged) -> Chart:
    import plotly.graph_objects as go

    title = "Final score distribution: frauds vs genuine"
    fig = _figure(
        title,
        xaxis={"title": {"text": "final score (log scale)"}, "type": "log"},
        yaxis={"title": {"text": "share of the class"}},
    )
    final = j.scored.scores["final"]
    for name, rows, color in (
        ("genuine", j.judged & (j.y == 0), COLORS["xgboost"]),
        ("fraud", j.frauds, COLORS["final"]),
    ):
        if not rows.any():
            continue
        counts, edges = log_histogram(final[rows], SCORE_FLOOR, 1.0, 60)
        share = counts / counts.sum()
        fig.add_trace(
            go.Scatter(
                x=edges,
                y=np.r_[share, share[-1]],
                mode="lines",
                line_shape="hv",
                fill="tozeroy",
                name=f"{name} ({int(rows.sum())})",
                line={"color": color},
            )
        )
    if fig.data:
        fig.add_vline(x=float(np.median(j.scored.threshold)), line_dash="dash", annotation_text="threshold")
    else:
        _empty(fig, "no judged transactions")
    return Chart(
        "scores",
        title,
        f"Judged transactions; scores below {SCORE_FLOOR:g} are counted in the first bin.",
        fig,
    )


def _alerts_per_day(j: Judged) -> Chart:
    import plotly.graph_objects as go

    title = "Alerts and precision per day"
    daily = daily_alerts(j.day, j.scored.alert, j.judged, j.y)
    precision_axis = {
        "title": {"text": "precision"},
        "overlaying": "y",
        "side": "right",
        "range": [0, 1.05],
        "tickmode": "linear",
        "tick0": 0,
        "dtick": 0.2,
        "showgrid": False,
    }
    fig = _figure(title, xaxis=j.day_axis, yaxis={"title": {"text": "alerts"}}, yaxis2=precision_axis)
    fig.add_trace(go.Bar(x=daily.days, y=daily.alerts, name="alerts", marker_color="#9ecae1"))
    fig.add_trace(
        go.Scatter(
            x=daily.days,
            y=_nan_to_none(daily.precision),
            yaxis="y2",
            mode="lines+markers",
            name="precision of judged alerts",
            line={"color": COLORS["final"]},
        )
    )
    j.summary["alerts"] = (
        f"{int(j.scored.alert.sum())} ({int(daily.judged.sum())} judged, {int(daily.frauds.sum())} fraud)"
    )
    about = (
        "Bars: every alert of the day. Line: the share of the day's judged alerts that were fraud "
        "(no point on a day without one)."
    )
    return Chart("alerts", title, about, fig)


def _card_precision(j: Judged, k: int) -> Chart:
    import plotly.graph_objects as go

    title = f"Card Precision@{k} per day"
    fig = _figure(title, xaxis=j.day_axis, yaxis={"title": {"text": f"fraudulent cards among the top {k}"}})
    rows = j.judged
    cards = np.asarray(j.scored.cards)[rows]
    for m in MODELS if rows.any() else ():
        days, values = daily_card_precision(j.day[rows], cards, j.y[rows], j.scored.scores[m][rows], k)
        fig.add_trace(
            go.Scatter(
                x=days,
                y=values,
                mode="lines+markers",
                line={"color": COLORS[m]},
                name=f"{MODEL_NAMES[m]} (mean {np.mean(values):.3f})",
            )
        )
        j.summary[f"{MODEL_NAMES[m]}: Card Precision@{k}"] = f"{np.mean(values):.3f}"
    if not fig.data:
        _empty(fig, "no judged transactions")
    about = (
        f"Each day, the {k} cards with the highest score (a card's highest that day) among the judged "
        "transactions: the share that had a fraud that day, divided by k even on a day with fewer "
        "cards (models.evaluation.card_precision_at_k)."
    )
    return Chart("card-precision", title, about, fig)


def _pattern_recall(j: Judged) -> Chart:
    import plotly.graph_objects as go

    title = "Recall per fraud pattern"
    by_pattern = recall_by_pattern(j.pattern_of, j.frauds, j.caught)
    fig = _figure(
        title,
        yaxis={"title": {"text": "recall at the threshold"}, "range": [0, 1.1]},
        xaxis={"title": {"text": "pattern"}},
        barmode="group",
    )
    names = [_plot_text(p) for p in by_pattern]
    for m, label in (("xgboost", "XGBoost alone"), ("final", "final decision")) if by_pattern else ():
        got = [by_pattern[p][m] for p in by_pattern]
        fig.add_trace(
            go.Bar(
                x=names,
                y=[c / n for c, n in got],
                text=[f"{c}/{n}" for c, n in got],
                name=label,
                marker_color=COLORS[m],
                textposition="outside",
            )
        )
    if by_pattern:
        about = (
            "Judged frauds whose generator pattern the transactions file names: the share XGBoost "
            "alone would have alerted on (its score against the threshold), and the share alerted."
        )
    else:
        _empty(fig, f"Fraud patterns: {NOT_NAMED}")
        about = f"Fraud patterns are {NOT_NAMED} (only generated transactions files name them)."
    return Chart("patterns", title, about, fig)


def _adaptation(j: Judged, drift_day: float | None, window: int) -> Chart:
    import plotly.graph_objects as go

    title = f"Adaptation: recall of XGBoost alone vs final ({window}-day trailing window)"
    fig = _figure(
        title, xaxis=j.day_axis, yaxis={"title": {"text": "recall at the threshold"}, "range": [0, 1.05]}
    )
    days = day_range(j.day)
    late = _late_patterns(j.pattern_of, j.day, drift_day)
    late_frauds = j.frauds & np.isin(j.pattern_of, sorted(late))
    for m, label in (("xgboost", "XGBoost alone"), ("final", "final")):
        caught = j.caught[m]
        fig.add_trace(
            go.Scatter(
                x=days,
                y=_nan_to_none(trailing_recall(j.day, j.frauds, caught, days, window)),
                mode="lines+markers",
                name=f"{label}, all frauds",
                line={"color": COLORS[m]},
            )
        )
        if late:
            fig.add_trace(
                go.Scatter(
                    x=days,
                    y=_nan_to_none(trailing_recall(j.day, late_frauds, caught, days, window)),
                    mode="lines",
                    name=f"{label}, late pattern",
                    line={"color": COLORS[m], "dash": "dash"},
                )
            )
    if drift_day is not None:
        fig.add_vline(
            x=drift_day,
            line_dash="dot",
            line_color="#444",
            annotation_position="top left",
            annotation_text=f"late pattern starts (day {drift_day:g})",
        )
    about = (
        f"Judged frauds of the {window} days ending on each day: the share XGBoost alone would have "
        "alerted on, against the share the final decision (XGBoost + River, which learns each label "
        "as it arrives) alerted on."
    )
    if late:
        about += (
            f" Dashed: the pattern(s) first seen on or after day {drift_day:g}: {', '.join(sorted(late))}."
        )
    return Chart("adaptation", title, about, fig)


def _latency(j: Judged) -> Chart:
    import plotly.graph_objects as go

    title = "Latency histogram"
    fig = _figure(
        title,
        xaxis={"title": {"text": "milliseconds (log scale)"}, "type": "log"},
        yaxis={"title": {"text": "transactions"}},
    )
    ms = j.scored.latency_ms[np.isfinite(j.scored.latency_ms)]
    if ms.size:
        lo = max(float(ms[ms > 0].min()) if (ms > 0).any() else 1e-3, 1e-3)
        counts, edges = log_histogram(ms, lo, max(float(ms.max()), lo * 2), 50)
        p50, p99 = np.quantile(ms, [0.5, 0.99])
        fig.add_trace(
            go.Scatter(
                x=edges,
                y=np.r_[counts, counts[-1]],
                mode="lines",
                line_shape="hv",
                fill="tozeroy",
                name=f"p50 {p50:.3g} ms · p99 {p99:.3g} ms ({ms.size})",
            )
        )
        j.summary["latency p50 / p99"] = f"{p50:.3g} ms / {p99:.3g} ms"
    else:
        _empty(fig, "no latency recorded")
    about = j.scored.latency_about
    return Chart("latency", title, about[:1].upper() + about[1:] + ".", fig)


def _reasons(j: Judged) -> Chart:
    import plotly.graph_objects as go

    title = "Top alert reasons"
    top = j.scored.reasons.most_common(TOP_REASONS)[::-1]
    fig = _figure(
        title,
        xaxis={"title": {"text": "alerts naming it"}},
        height=max(360, 120 + 24 * len(top)),
        margin={"t": 60, "b": 60, "l": 260, "r": 30},
    )
    if top:
        fig.add_trace(
            go.Bar(
                x=[n for _, n in top],
                y=[_plot_text(r) for r, _ in top],
                orientation="h",
                marker_color="#ff7f0e",
                name="alerts",
            )
        )
    else:
        _empty(fig, "no alert names a reason")
    about = (
        f"The {TOP_REASONS} features (each alert's top XGBoost contributions) and rules that alerts "
        "list most often."
    )
    return Chart("reasons", title, about, fig)


def _late_patterns(pattern_of: np.ndarray, day: np.ndarray, drift_day: float | None) -> set[str]:
    """Named patterns whose first transaction (judged or not) falls on or after `drift_day`."""
    if drift_day is None:
        return set()
    return {p for p in set(pattern_of.tolist()) - {""} if day[pattern_of == p].min() >= drift_day}


def _thresholds(t: np.ndarray) -> str:
    values = np.unique(t[np.isfinite(t)])
    if not values.size:
        return "unknown"
    if values.size == 1:
        return f"{values[0]:.4f}"
    return f"{values.size} thresholds, {values.min():.4f} .. {values.max():.4f}"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1280px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
table.facts { border-collapse: collapse; margin: 12px 0 24px; }
table.facts td { padding: 3px 12px 3px 0; vertical-align: top; }
table.facts td:first-child { color: #555; }
section.chart { margin: 0 0 28px; border-top: 1px solid #ddd; padding-top: 8px; }
p.about { color: #555; margin: 4px 0 0; font-size: 0.92em; }
"""


def render_html(scored: Scored, charts: list[Chart], summary: Mapping[str, str], generated: str) -> str:
    """The whole page: plotly.js inline once, then the header and every chart with its note."""
    from plotly.offline import get_plotlyjs

    esc = html.escape
    facts = {"source": scored.source, **summary, **scored.facts}
    if scored.versions:
        facts["model versions"] = ", ".join(f"{v or '?'} ({n})" for v, n in scored.versions.most_common(5))
    rows = "\n".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in facts.items())
    sections = []
    config = {"displaylogo": False, "responsive": True}
    for c in charts:
        div = c.figure.to_html(
            full_html=False, include_plotlyjs=False, div_id=f"chart-{c.key}", config=config
        )
        sections.append(
            f'<section class="chart" id="section-{c.key}" data-title="{esc(c.title)}">\n{div}\n'
            f'<p class="about">{esc(c.about)}</p>\n</section>'
        )
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Fraud report · {esc(generated)}</title>\n<style>{STYLE}</style>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n<body>\n'
        f"<h1>Fraud scoring report</h1>\n<p>Generated {esc(generated)} by <code>fraud report</code>.</p>\n"
        f'<table class="facts">\n{rows}\n</table>\n{body}\n</body>\n</html>\n'
    )


def write_report(
    out: Path,
    scored: Scored,
    labels: Mapping[str, tuple[bool, int]],
    patterns: Mapping[str, str],
    *,
    k: int = 100,
    drift_day: float | None = None,
    window: int = 7,
) -> dict[str, Any]:
    """Build the charts, write the page to `out`; what was written."""
    charts, summary = build_charts(scored, labels, patterns, k=k, drift_day=drift_day, window=window)
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    page = render_html(scored, charts, summary, generated)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return {
        "out": str(out),
        "bytes": out.stat().st_size,
        "source": scored.source,
        "charts": [c.title for c in charts],
        **{key: summary[key] for key in ("transactions", "labelled", "judged")},
    }


# --- the command ---------------------------------------------------------------------------------


def report_command(
    out: Annotated[Path, typer.Option(help="HTML file to write (one file, opens offline).")],
    transactions: Annotated[
        Path | None,
        typer.Option(
            help="Transactions file to replay (default: FRAUD_TRANSACTIONS_PATH). With "
            "--from-decisions, only read for the generator's fraud pattern names."
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Labels file (default: FRAUD_LABELS_PATH; with --from-decisions, the input shard streams)."
        ),
    ] = None,
    from_decisions: Annotated[
        bool,
        typer.Option(
            "--from-decisions",
            help="Report on what the flow served (FRAUD_DECISION_STREAM, written with "
            "FRAUD_DECISION_LOG=1) and the alerts stream's latencies, instead of replaying files.",
        ),
    ] = False,
    k: Annotated[int, typer.Option(min=1, help="Cards reviewed per day, for Card Precision@k.")] = 100,
    drift_day: Annotated[
        float | None, typer.Option(help="Mark the day the late pattern starts on the adaptation curve.")
    ] = None,
    window: Annotated[int, typer.Option(min=1, help="Days of the adaptation curve's trailing window.")] = 7,
) -> None:
    """Write one self-contained HTML report: ROC and precision-recall curves per model, score
    distributions, alerts and precision per day, Card Precision@k per day, recall per fraud
    pattern, the adaptation curve, latencies and the top alert reasons."""
    from fraud.dataset import read_labels, read_patterns
    from fraud.display import print_json
    from service.settings import get_settings

    s = get_settings()
    if from_decisions:
        from fraud.decision_log import DecisionLogError, log_client, stream_labels

        for p, hint in ((labels, "--labels"), (transactions, "--transactions")):
            if p is not None and not p.is_file():
                raise typer.BadParameter(f"{p} does not exist", param_hint=hint)
        with log_client("fraud report", s) as client:
            scored = decisions_scored(client, s)
            if labels is not None:
                known, where = read_labels(labels), f"the labels file {labels}"
            else:
                known = stream_labels(client, s.input_stream, s.input_shards, wanted=set(scored.txn_ids))
                where = f"the input streams {s.input_stream}:{{0..{s.input_shards - 1}}}"
            if not any(t in known for t in scored.txn_ids):
                raise DecisionLogError(
                    f"none of the {len(scored)} decisions has a label in {where}"
                    + (
                        ""
                        if labels is not None
                        else " (trimmed away, or replayed without labels?): pass --labels"
                    )
                )
        scored.facts["labels"] = where
        patterns = read_patterns(transactions) if transactions is not None else {}
    else:
        txns = transactions or s.transactions_path
        labs = labels or s.labels_path
        if labs is None:
            raise typer.BadParameter("the report needs a labels file (--labels or FRAUD_LABELS_PATH)")
        for p, hint in ((txns, "--transactions"), (labs, "--labels")):
            if not p.is_file():
                raise typer.BadParameter(f"{p} does not exist", param_hint=hint)
        scored = replay_scored(s, txns, labs)
        if not len(scored):
            raise typer.BadParameter(
                f"{txns} holds no transaction that could be scored", param_hint="--transactions"
            )
        known, patterns = read_labels(labs), read_patterns(txns)
        scored.facts["labels"] = f"the labels file {labs}"
    print_json(write_report(out, scored, known, patterns, k=k, drift_day=drift_day, window=window))
