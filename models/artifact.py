"""Versioned model artifacts: one directory holding `model.ubj` and `meta.json`.

The artifact carries the feature schema it was trained on (ordered names and their hash). A flow
whose feature engine has changed must refuse to load a stale model, because XGBoost reads
columns by position: a reordered or renamed feature would be scored silently and wrongly.
`check_schema` turns that into a clear startup error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import xgboost as xgb

MODEL_FILE = "model.ubj"
META_FILE = "meta.json"
FORMAT = 1  # bump when meta.json changes incompatibly
_META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "version": str,
    "feature_names": list,
    "schema_hash": str,
    "threshold": (int, float),
    "metrics": dict,
    "trained_at": str,
    "params": dict,
}


class ArtifactError(Exception):
    """An artifact is missing, unreadable, or does not fit the running feature schema."""


@dataclass(frozen=True)
class ModelArtifact:
    """A trained booster plus everything needed to use and audit it."""

    version: str
    feature_names: list[str]
    schema_hash: str
    threshold: float
    metrics: dict[str, Any]
    trained_at: str
    params: dict[str, Any]
    booster: xgb.Booster
    reference: dict[str, Any] | None = None
    """The training rows' feature and score distributions (`models.drift.Reference.to_json`):
    what drift is measured against. Artifacts written before it have none (no data drift)."""


def make_version(schema_hash: str, when: datetime) -> str:
    """`xgb-<YYYYmmddHHMMSS UTC>-<first 8 hex of the schema hash>`: sortable, names its schema.

    `when` must be timezone-aware; a naive datetime would silently bake local time into the name.
    """
    if when.tzinfo is None:
        raise ValueError("make_version needs a timezone-aware datetime")
    prefix = schema_hash[:8].lower()
    if not re.fullmatch(r"[0-9a-f]{8}", prefix):
        raise ValueError(f"schema_hash must start with 8 hex digits, got {schema_hash!r}")
    return f"xgb-{when.astimezone(UTC):%Y%m%d%H%M%S}-{prefix}"


def _json_default(value: Any) -> Any:
    """Serialise numpy scalars (they carry `.item()`) that slip into metrics or params."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save(artifact: ModelArtifact, directory: Path) -> None:
    """Write `model.ubj` and `meta.json` (pretty, sorted keys) into `directory`, creating it.

    Each file is written to a temporary name and renamed into place, so a reader never sees a
    half-written file. Metrics may contain NaN (e.g. AUC of a fraud-free window); Python's json
    writes and reads it back as NaN.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "version": artifact.version,
        "feature_names": list(artifact.feature_names),
        "schema_hash": artifact.schema_hash,
        "threshold": float(artifact.threshold),
        "metrics": artifact.metrics,
        "trained_at": artifact.trained_at,
        "params": artifact.params,
    }
    if artifact.reference is not None:
        meta["reference"] = artifact.reference
    text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n"
    tmp_model = directory / f".{MODEL_FILE}.tmp"
    tmp_meta = directory / f".{META_FILE}.tmp"
    tmp_model.write_bytes(bytes(artifact.booster.save_raw(raw_format="ubj")))
    tmp_meta.write_text(text, encoding="utf-8")
    os.replace(tmp_model, directory / MODEL_FILE)
    os.replace(tmp_meta, directory / META_FILE)


def load(directory: Path) -> ModelArtifact:
    """Read an artifact written by `save`; any problem raises `ArtifactError` naming the path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist; run `fraud train`")
    model_path, meta_path = directory / MODEL_FILE, directory / META_FILE
    for path in (model_path, meta_path):
        if not path.is_file():
            raise ArtifactError(f"model artifact is incomplete: {path} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {meta_path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_path} must hold a JSON object")
    if meta.get("format") != FORMAT:
        found = meta.get("format")
        raise ArtifactError(f"{meta_path}: unsupported format {found!r}, expected {FORMAT}")
    for key, kind in _META_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ArtifactError(f"{meta_path}: field {key!r} is missing or of the wrong type")
    names = meta["feature_names"]
    if not all(isinstance(n, str) for n in names):
        raise ArtifactError(f"{meta_path}: feature_names must be strings")
    booster = xgb.Booster()
    try:
        booster.load_model(str(model_path))
    except xgb.core.XGBoostError as exc:
        raise ArtifactError(f"cannot load {model_path}: {exc}") from exc
    if booster.num_features() != len(names) or (
        booster.feature_names is not None and list(booster.feature_names) != names
    ):
        raise ArtifactError(f"{model_path} does not match the feature names in {meta_path}")
    return ModelArtifact(
        version=meta["version"],
        feature_names=names,
        schema_hash=meta["schema_hash"],
        threshold=float(meta["threshold"]),
        metrics=meta["metrics"],
        trained_at=meta["trained_at"],
        params=meta["params"],
        booster=booster,
        reference=meta.get("reference") if isinstance(meta.get("reference"), dict) else None,
    )


def check_schema(artifact: ModelArtifact, schema_hash: str, feature_names: list[str]) -> None:
    """Raise `ArtifactError` unless the artifact was trained on exactly this feature schema."""
    names = list(feature_names)
    if artifact.schema_hash == schema_hash and list(artifact.feature_names) == names:
        return
    detail = "the feature lists are identical (only the hash differs)"
    for i, (ours, theirs) in enumerate(zip(artifact.feature_names, names, strict=False)):
        if ours != theirs:
            detail = f"first difference at position {i}: model {ours!r}, pipeline {theirs!r}"
            break
    else:
        if len(artifact.feature_names) != len(names):
            detail = f"model has {len(artifact.feature_names)} features, pipeline has {len(names)}"
    raise ArtifactError(
        f"model {artifact.version} was trained on feature schema {artifact.schema_hash} but the "
        f"pipeline computes schema {schema_hash}; {detail}. Retrain with `fraud train`."
    )
