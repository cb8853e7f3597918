"""The one settings object. Every `FRAUD_*` environment variable is declared here, nowhere else."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SAMPLES = Path("data/samples")


class Settings(BaseSettings):
    """Runtime configuration, read once from `FRAUD_*` environment variables (or a `.env` file)."""

    model_config = SettingsConfigDict(env_prefix="FRAUD_", env_file=".env", frozen=True, extra="ignore")

    # Inputs
    source: Literal["file", "redis"] = Field("file", description="Replay files, or read Redis shard streams.")
    input_stream: str = Field(
        "fraud:in", description="Prefix of the input shard streams: <prefix>:{0} .. {n-1}."
    )
    input_shards: int = Field(4, ge=1, description="Number of input shard streams (Bytewax partitions).")
    source_block_ms: int = Field(
        0, ge=0, le=1000, description="Longest a Redis read may wait for data (0: it never waits)."
    )
    source_poll_ms: int = Field(
        5, ge=0, le=1000, description="After a read that found nothing, wait this long before the next one."
    )
    source_linger_ms: int = Field(
        10,
        ge=0,
        le=1000,
        description="After a read that found fewer records than a batch, wait this long before the next one.",
    )
    source_idle_ms: int = Field(
        250,
        ge=1,
        description="A shard empty this long stops holding the others back (see Scale-out in the README).",
    )
    source_idle_exit_s: float | None = Field(
        None, gt=0, description="Stop once every shard was empty this long."
    )
    transactions_path: Path = Field(
        SAMPLES / "transactions.jsonl.gz", description="Transactions file replayed by the flow."
    )
    labels_path: Path | None = Field(
        SAMPLES / "labels.jsonl.gz",
        description="Labels file merged in event time; empty to disable.",
    )
    source_batch_size: int = Field(1000, ge=1, description="Records handed to Bytewax per source poll.")

    # Redis
    redis_url: SecretStr | None = Field(
        None, description="redis:// or rediss:// URL; unset starts an embedded server."
    )
    redis_dir: Path = Field(Path(".fraud/redis"), description="Data directory of the embedded Redis server.")
    redis_retry_budget_s: float = Field(
        30.0,
        gt=0,
        description="Seconds the Redis source and sinks ride out one outage before the flow stops with an error.",
    )
    alerts_stream: str = Field("fraud:alerts", description="Stream that receives alerts.")
    dlq_stream: str = Field("fraud:dlq", description="Stream that receives dead letters.")
    late_stream: str = Field(
        "fraud:late", description="Side output: transactions beyond the allowed lateness."
    )
    drift_stream: str = Field("fraud:drift", description="Stream that receives drift events.")
    stream_maxlen: int = Field(1_000_000, ge=1, description="Approximate MAXLEN trim applied on every XADD.")
    stream_retention_days: float | None = Field(
        None, gt=0, description="Also trim entries older than this (MINID)."
    )
    decision_log: bool = Field(
        False, description="Write every decision (features, scores, reasons) to the decision stream."
    )
    decision_stream: str = Field("fraud:decisions", description="Stream of the decision log (audit trail).")
    decision_retention_days: float = Field(
        400.0,
        gt=0,
        description="The decision log keeps every decision this long (by age, never by count: FRAUD_STREAM_MAXLEN does not apply to it).",
    )
    dedupe_ttl_s: int = Field(
        7 * 86_400, ge=1, description="How long a sent marker prevents a duplicate alert."
    )
    decision_dedupe_ttl_s: int = Field(
        3_600, ge=1, description="Marker lifetime for decision-log entries (one per transaction)."
    )
    card_token_key: SecretStr | None = Field(
        None, description="Key of the HMAC that replaces card ids in outputs."
    )
    command_key: SecretStr | None = Field(
        None,
        description="Key of the HMAC that signs operator commands (`fraud model`, `fraud rules`); when set, the flow refuses unsigned ones.",
    )

    # Features
    feature_set: Literal["default", "textbook"] = Field(
        "default", description="Feature set (features/catalog.py); the model must be trained on it."
    )
    allowed_lateness_s: float = Field(
        300.0, ge=0, description="Out-of-orderness tolerated with exact features."
    )
    label_ttl_days: float = Field(
        60.0, gt=0, description="How long a scored transaction waits for its label."
    )

    # Models and scoring
    model_path: Path = Field(
        Path("models/artifacts/default"), description="Artifact directory written by `fraud train`."
    )
    model_registry: Path = Field(
        Path(".fraud/registry"),
        description="Registry of model versions (`fraud model`); its champion, when it has one, is served instead of FRAUD_MODEL_PATH.",
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="Alert threshold; unset uses the artifact's."
    )
    scoring_batch_size: int = Field(
        1024, ge=1, description="Transactions per vectorised XGBoost call (at most)."
    )
    xgb_device: Literal["cpu", "cuda"] = Field("cpu", description="XGBoost device for training and scoring.")
    xgb_nthread: int = Field(1, ge=1, description="XGBoost threads inside the flow (Bytewax owns a core).")
    online_weight: float = Field(0.5, ge=0, le=1, description="Weight of the River score in the final score.")
    online_warmup_labels: int = Field(5000, ge=0, description="Labels River must learn before it counts.")
    online_lr: float = Field(0.01, gt=0, description="River SGD learning rate.")
    online_l2: float = Field(0.0, ge=0, description="River L2 regularisation.")
    online_pos_weight: float = Field(1.0, gt=0, description="Weight of a fraud label in River's loss.")
    top_reasons: int = Field(3, ge=0, description="Feature contributions listed in each alert.")
    drift_watch: bool = Field(
        True, description="Watch data and concept drift in the scorer (see docs/models.md, Drift)."
    )
    drift_window_hours: int = Field(
        168, ge=1, le=24 * 60, description="Hours of event time each feature's PSI is computed over."
    )
    drift_psi_threshold: float = Field(
        0.25, gt=0, description="PSI above which a feature (or the score) is reported drifting."
    )
    drift_min_rows: int = Field(500, ge=1, description="Transactions a PSI window needs before it is judged.")
    drift_label_window: int = Field(
        5000, ge=100, description="Last labels the prequential quality metrics are computed over."
    )
    drift_delta: float = Field(
        0.002,
        gt=0,
        lt=1,
        description="ADWIN's confidence on each model's missed-fraud rate (smaller: fewer, later alarms).",
    )

    # Operations
    recovery_dir: Path | None = Field(
        None, description="Bytewax recovery directory (`fraud run` creates it)."
    )
    recovery_partitions: int = Field(
        8, ge=1, description="Recovery partitions created (>= workers ever used)."
    )
    state_shards: int = Field(
        16,
        ge=1,
        le=4096,
        description="Shards of each keyed step's state (index, entity steps, pending): fixed for a recovery store's life; a multiple of the largest worker count you will run (16: even over 1, 2, 4, 8, 16 workers).",
    )
    recovery_fresh: bool = Field(
        False,
        description="Move a damaged or mismatched recovery store aside and start a new one, instead of refusing.",
    )
    snapshot_interval_s: float = Field(
        10.0,
        gt=0,
        description="Epoch and snapshot interval with recovery on: each epoch close holds the input a few tens of ms, and a crash replays up to one epoch of input.",
    )
    snapshot_ahead: bool = Field(
        True,
        description="With recovery, each shard of the label index and of pending writes its changes once during the epoch, so the epoch close (which holds the input) writes only the rest.",
    )
    progress_interval_s: float = Field(2.0, gt=0, description="Seconds between progress lines.")
    metrics_port: int | None = Field(None, description="Serve /metrics on this port (besides Bytewax's API).")

    @property
    def output_streams(self) -> list[str]:
        """Every stream the flow writes (what `fraud reset` deletes)."""
        return [
            self.alerts_stream,
            self.dlq_stream,
            self.late_stream,
            self.drift_stream,
            self.decision_stream,
        ]

    @field_validator(
        "labels_path",
        "redis_url",
        "threshold",
        "metrics_port",
        "source_idle_exit_s",
        "stream_retention_days",
        "card_token_key",
        "command_key",
        "recovery_dir",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    def redis_url_value(self) -> str | None:
        return self.redis_url.get_secret_value() if self.redis_url else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
