"""Training data from what the flow served: the decision log (`FRAUD_DECISION_LOG=1`) as a `Dataset`.

With the decision log on, the flow writes every scored transaction to `FRAUD_DECISION_STREAM`
(`flows.outputs.decision_entry`): its id, card, event time and the feature vector it was scored
with, by name. That is the training matrix `fraud.dataset.build_dataset` would rebuild by replaying
the files, without the files and without replaying weeks of history through the feature engine:
`fraud train --from-decisions` fits on it.

- The stream is read in pages (`XRANGE … COUNT`), so memory holds the matrix, never one reply of
  the whole stream. Fields are read by name; fields this module does not know are ignored.
- Every entry's feature names must be the pipeline's (order aside: columns are placed by name),
  and a model version of the `xgb-<time>-<schema>` form must name the pipeline's schema: a
  decision logged by a model of another feature schema is refused, not silently misread.
- A transaction logged twice (the sink is idempotent, so it should not be) keeps its first entry.
- Labels (with their arrival time, which `Dataset.training_rows` needs) come from a labels file
  (`fraud.dataset.read_labels`), or else from the label records of the input shard streams
  (`FRAUD_INPUT_STREAM:{i}`), whose event time is their arrival time, as in a labels file.
- Rows are in event-time order, ties by txn_id: `build_dataset`'s order on a time-ordered file
  whose ids sort in time within a millisecond (generated files); the flow's own output order
  depends on its workers, this one does not.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import redis

from features.engine import FeaturePipeline
from features.events import Label, decode_label
from flows.redis_source import ENTRY_KIND, ENTRY_PAYLOAD, shard_stream
from fraud.consumer import scan_stream
from fraud.dataset import Dataset, read_labels
from fraud.display import show
from fraud.train import Calendar, Split, train_on
from models import evaluation
from service.settings import Settings

PAGE = 1000  # entries per XRANGE
MAX_VERSIONS_REPORTED = 20
NAN = math.nan
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_VERSION = re.compile(r"xgb-\d{14}-(?P<schema>[0-9a-f]{8})")  # `models.artifact.make_version`
_features_decoder = msgspec.json.Decoder(dict[str, float | None])


class DecisionLogError(ValueError):
    """The decision log cannot be trained on: empty, malformed, or of another feature schema."""


@dataclass
class DecisionLog:
    """The decisions of a decision stream, one per transaction, in the order of the stream."""

    txn_ids: list[str]
    ts_ms: np.ndarray  # int64 epoch ms (event time)
    cards: list[str]
    X: np.ndarray  # float32, NaN for null (missing or non-finite when served)
    model_versions: list[str]
    entries: int = 0  # entries read, duplicates included
    duplicates: int = 0  # entries of a transaction logged before (dropped)
    versions: dict[str, int] = field(default_factory=dict)  # decisions per model version (the most common)

    def __len__(self) -> int:
        return len(self.txn_ids)


def parse_ts_ms(text: str) -> int:
    """Epoch milliseconds of an RFC 3339 time with an offset (`flows.outputs.rfc3339`), in exact
    integer arithmetic (no float on the way)."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError(f"time {text!r} has no UTC offset")
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="backslashreplace") if isinstance(value, bytes) else str(value)


def _differs(got: list[str], names: list[str]) -> str:
    """What differs between an entry's feature names and the pipeline's (stream content escaped)."""
    missing = [n for n in names if n not in set(got)]
    extra = [show(n, 64) for n in got if n not in set(names)]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"unknown {', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}")
    return "; ".join(parts) or "the same names repeated"


class _Columns:
    """Puts an entry's feature values in the columns of `names`, by name."""

    def __init__(self, names: list[str], schema_hash: str | None, stream: str) -> None:
        self.names = list(names)
        self.schema = schema_hash[:8].lower() if schema_hash else None
        self.stream = stream
        self._order: dict[tuple[str, ...], list[int] | None] = {tuple(self.names): None}
        self._versions: set[str] = set()

    def check_version(self, entry_id: str, version: str) -> None:
        if version in self._versions:
            return
        m = _VERSION.fullmatch(version)
        if self.schema is not None and m is not None and m["schema"] != self.schema:
            raise DecisionLogError(
                f"decision {entry_id} in {self.stream!r} was served by model {version}, of feature "
                f"schema {m['schema']}; this pipeline's schema is {self.schema} (FRAUD_FEATURE_SET, "
                "features/catalog.py): train with the feature set that model was served with, or on "
                "a decision stream of models of this schema"
            )
        self._versions.add(version)

    def row(self, entry_id: str, version: str, raw: bytes | str) -> list[float]:
        try:
            values = _features_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise DecisionLogError(
                f"decision {entry_id} in {self.stream!r}: `features` is not a JSON object of numbers: "
                f"{show(str(exc), 200)}"
            ) from None
        keys = tuple(values)
        if keys not in self._order:
            if len(keys) != len(self.names) or set(keys) != set(self.names):
                raise DecisionLogError(
                    f"decision {entry_id} in {self.stream!r} (model {show(version, 100)}) has "
                    f"{len(keys)} features that are not this pipeline's {len(self.names)} "
                    f"({_differs(list(keys), self.names)}): it was logged by a model of another "
                    "feature schema; train with the feature set it was served with (FRAUD_FEATURE_SET)"
                )
            self._order[keys] = [keys.index(n) for n in self.names]
        got = [NAN if v is None else v for v in values.values()]
        order = self._order[keys]
        return got if order is None else [got[i] for i in order]


def read_decision_log(
    client: redis.Redis,
    stream: str,
    names: list[str],
    *,
    schema_hash: str | None = None,
    page: int = PAGE,
) -> DecisionLog:
    """Every decision of `stream`, columns of X in the order of `names` (float32, as
    `build_dataset` makes them), read `page` entries at a time. Raises `DecisionLogError` when the
    stream is empty, an entry lacks a field or cannot be read, or its features (or the schema its
    model version names, when `schema_hash` is given) are not the pipeline's."""
    columns = _Columns(names, schema_hash, stream)
    ids: list[str] = []
    ts: list[int] = []
    cards: list[str] = []
    versions: list[str] = []
    chunks: list[np.ndarray] = []
    rows: list[list[float]] = []
    seen: set[str] = set()
    known_versions: dict[str, str] = {}
    entries = duplicates = 0
    for entry_id, raw in scan_stream(client, stream, page):
        entries += 1
        fields = {_text(k): v for k, v in raw.items()}
        try:
            txn_id = _text(fields["txn_id"])
            if txn_id in seen:
                duplicates += 1
                continue
            version = _text(fields.get("model_version", b""))
            version = known_versions.setdefault(version, version)  # one string per version
            columns.check_version(entry_id, version)
            row = columns.row(entry_id, version, fields["features"])
            ts_ms = parse_ts_ms(_text(fields["ts"]))
            card = _text(
                fields["card_id"] if "card_id" in fields else fields["card"]
            )  # "card" before 2026-12
        except KeyError as exc:
            raise DecisionLogError(
                f"decision {entry_id} in {stream!r} has no {exc.args[0]!r} field"
            ) from None
        except ValueError as exc:
            if isinstance(exc, DecisionLogError):
                raise
            raise DecisionLogError(f"decision {entry_id} in {stream!r}: {show(str(exc), 200)}") from None
        seen.add(txn_id)
        ids.append(txn_id)
        ts.append(ts_ms)
        cards.append(card)
        versions.append(version)
        rows.append(row)
        if len(rows) >= page:
            chunks.append(np.asarray(rows, dtype=np.float32).reshape(len(rows), len(names)))
            rows = []
    if not ids:
        raise DecisionLogError(
            f"the decision stream {stream!r} is empty: run the flow with FRAUD_DECISION_LOG=1 "
            "(FRAUD_DECISION_STREAM names the stream) before training from it"
        )
    chunks.append(np.asarray(rows, dtype=np.float32).reshape(len(rows), len(names)))
    X = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    return DecisionLog(
        ids,
        np.asarray(ts, dtype=np.int64),
        cards,
        X,
        versions,
        entries,
        duplicates,
        dict(Counter(versions).most_common(MAX_VERSIONS_REPORTED)),
    )


def stream_labels(
    client: redis.Redis, prefix: str, shards: int, *, wanted: set[str] | None = None, page: int = PAGE
) -> dict[str, tuple[bool, int]]:
    """The label records of the input shard streams `<prefix>:{0}` .. `{shards-1}` as
    `read_labels` gives a file's: txn_id -> (is_fraud, arrival time = the label's event time). The
    first label of a transaction counts (stream-id order: the order `fraud replay` pushed them);
    records that do not decode are skipped, as the flow dead-letters them. With `wanted`, only
    those transactions' labels are kept."""
    found: dict[str, tuple[bool, int, tuple[int, int]]] = {}
    for shard in range(shards):
        for entry_id, fields in scan_stream(client, shard_stream(prefix, shard), page):
            if fields.get(ENTRY_KIND.encode()) != b"label":
                continue
            label = decode_label(fields.get(ENTRY_PAYLOAD.encode(), b""))
            if not isinstance(label, Label) or (wanted is not None and label.txn_id not in wanted):
                continue
            ms, _, seq = entry_id.partition("-")
            order = (int(ms), int(seq or 0))
            known = found.get(label.txn_id)
            if known is None or order < known[2]:
                found[label.txn_id] = (label.is_fraud, label.ts_ms, order)
    return {txn_id: (is_fraud, ts) for txn_id, (is_fraud, ts, _) in found.items()}


def dataset_of(log: DecisionLog, labels: dict[str, tuple[bool, int]]) -> Dataset:
    """The `Dataset` of the decisions with their labels, rows in event-time order (ties by txn_id)."""
    ts, ids = log.ts_ms.tolist(), log.txn_ids
    order = sorted(range(len(log)), key=lambda i: (ts[i], ids[i]))
    return Dataset.of(
        log.X[order], [ts[i] for i in order], [ids[i] for i in order], [log.cards[i] for i in order], labels
    )


def decision_dataset(
    client: redis.Redis,
    settings: Settings,
    pipeline: FeaturePipeline,
    labels: Path | None = None,
    *,
    stream: str | None = None,
    page: int = PAGE,
) -> tuple[Dataset, DecisionLog]:
    """The `Dataset` of the decision stream (`stream`, default FRAUD_DECISION_STREAM) with the
    labels of the `labels` file, or else of the input shard streams (FRAUD_INPUT_STREAM,
    FRAUD_INPUT_SHARDS); and the log it was read from. Raises `DecisionLogError` (see
    `read_decision_log`), also when no decision has a label."""
    stream = stream or settings.decision_stream
    log = read_decision_log(client, stream, list(pipeline.names), schema_hash=pipeline.schema_hash, page=page)
    if labels is not None:
        known = read_labels(labels)
        where = f"the labels file {labels}"
    else:
        wanted = set(log.txn_ids)
        known = stream_labels(client, settings.input_stream, settings.input_shards, wanted=wanted, page=page)
        where = f"the input streams {shard_stream(settings.input_stream, 0)} .. " + shard_stream(
            settings.input_stream, settings.input_shards - 1
        )
    data = dataset_of(log, known)
    if not (data.y >= 0).any():
        raise DecisionLogError(
            f"none of the {len(log)} decisions in {stream!r} has a label in {where}"
            + ("" if labels is not None else " (trimmed away, or replayed without labels?): pass --labels")
        )
    return data, log


def source_of(stream: str, data: Dataset) -> str:
    """The report's `source`: `decision log <stream> (<n> decisions, <m> labelled)`."""
    return f"decision log {stream} ({len(data.txn_ids)} decisions, {int((data.y >= 0).sum())} labelled)"


def train_from_decisions(
    client: redis.Redis,
    settings: Settings,
    pipeline: FeaturePipeline,
    out_dir: Path,
    *,
    labels: Path | None = None,
    stream: str | None = None,
    split: Split | Calendar,
    k: int = 100,
    search: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """`fraud train --from-decisions`: fit on the decision log (see `decision_dataset`) as
    `fraud.train.train` does on replayed files, save the artifact to `out_dir`; the report."""
    stream = stream or settings.decision_stream
    data, log = decision_dataset(client, settings, pipeline, labels, stream=stream)
    extra = {
        "decision_log": {
            "stream": stream,
            "entries": log.entries,
            "duplicates": log.duplicates,
            "decisions_by_model": log.versions,
            "labels": str(labels) if labels is not None else f"input streams {settings.input_stream}",
        }
    }
    return train_on(
        settings, pipeline, data, out_dir, source=source_of(stream, data), split=split, k=k,
        search=search, seed=seed, extra=extra,
    )  # fmt: skip


def compare_models(
    client: redis.Redis,
    settings: Settings,
    labels: Path | None = None,
    *,
    stream: str | None = None,
    page: int = PAGE,
) -> dict[str, Any]:
    """`fraud evaluate --from-decisions`: how each model did on the labels that arrived, from the
    decision log alone. Per champion version, its decisions' scores and alerts against their
    labels; per (champion, shadow) pair, both judged on the same labelled transactions (the ones
    the shadow scored), final score and XGBoost alone. Labels as in `decision_dataset`."""
    stream = stream or settings.decision_stream
    rows: dict[str, tuple[str, float, float, float, str, float, float, float]] = {}
    for entry_id, raw in scan_stream(client, stream, page):
        f = {_text(k): _text(v) for k, v in raw.items() if _text(k) != "features"}
        try:
            shadow = f.get("shadow_version", "")
            rows.setdefault(
                f["txn_id"],
                (
                    f["model_version"], float(f["score"]), float(f["xgb_score"]), float(f["threshold"]),
                    shadow, float(f["shadow_score"]) if shadow else NAN,
                    float(f["shadow_xgb_score"]) if shadow else NAN, float(f["shadow_alert"]) if shadow else NAN,
                ),
            )  # fmt: skip
        except (KeyError, ValueError) as exc:
            raise DecisionLogError(
                f"decision {entry_id} in {stream!r}: cannot read {show(str(exc), 200)}"
            ) from None
    if not rows:
        raise DecisionLogError(
            f"the decision stream {stream!r} is empty: run the flow with FRAUD_DECISION_LOG=1"
        )
    if labels is not None:
        known = read_labels(labels)
    else:
        known = stream_labels(client, settings.input_stream, settings.input_shards, wanted=set(rows))
    labelled = [(known[t][0], r) for t, r in rows.items() if t in known]
    report: dict[str, Any] = {
        "source": f"decision log {stream} ({len(rows)} decisions, {len(labelled)} labelled)",
        "champions": {},
        "shadows": [],
    }
    by_version: dict[str, list[tuple[bool, tuple[Any, ...]]]] = {}
    by_pair: dict[tuple[str, str], list[tuple[bool, tuple[Any, ...]]]] = {}
    for is_fraud, r in labelled:
        by_version.setdefault(r[0], []).append((is_fraud, r))
        if r[4]:
            by_pair.setdefault((r[0], r[4]), []).append((is_fraud, r))
    for version, group in sorted(by_version.items()):
        y = np.fromiter((g[0] for g in group), dtype=np.int8)
        report["champions"][version] = {
            "final": evaluation.evaluate(y, [g[1][1] for g in group], group[0][1][3]),
            "xgboost_auc": evaluation.roc_auc(y, [g[1][2] for g in group]),
            "xgboost_ap": evaluation.average_precision(y, [g[1][2] for g in group]),
        }
    for (champion, challenger), group in sorted(by_pair.items()):
        y = np.fromiter((g[0] for g in group), dtype=np.int8)
        cols = np.asarray([g[1][1:4] + g[1][5:8] for g in group], dtype=np.float64)
        # columns: score, xgb_score, threshold, shadow_score, shadow_xgb_score, shadow_alert
        alerts, frauds = cols[:, 5] == 1, y == 1  # the shadow's alerts, the frauds
        caught = int((alerts & frauds).sum())
        report["shadows"].append(
            {
                "champion": champion,
                "challenger": challenger,
                "n": int(y.size),
                "positives": int(frauds.sum()),
                "champion_final": evaluation.evaluate(y, cols[:, 0], float(cols[0, 2])),
                "challenger_final": {
                    "auc": evaluation.roc_auc(y, cols[:, 3]),
                    "ap": evaluation.average_precision(y, cols[:, 3]),
                    "precision": caught / int(alerts.sum()) if alerts.any() else NAN,
                    "recall": caught / int(frauds.sum()) if frauds.any() else NAN,
                    "alerts": int(alerts.sum()),
                },
                "champion_xgboost_ap": evaluation.average_precision(y, cols[:, 1]),
                "challenger_xgboost_ap": evaluation.average_precision(y, cols[:, 4]),
            }
        )
    return report


@contextmanager
def log_client(command: str, settings: Settings) -> Iterator[redis.Redis]:
    """A client of the flow's Redis for a command reading the decision log; a log that cannot be
    used (`DecisionLogError`) or Redis out of reach ends the command with one line on stderr and
    exit status 1, never a traceback."""
    import typer

    from service.redis_client import connect, redact
    from service.redis_server import redis_url

    url = redis_url(settings)
    client = connect(url)
    try:
        yield client
    except DecisionLogError as exc:
        typer.echo(f"{command}: {exc}", err=True)
        raise typer.Exit(1) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        typer.echo(f"{command}: reading {redact(url)} failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()
