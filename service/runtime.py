"""Everything the flow and the CLI resolve from settings: feature pipeline, model, Redis URL."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from features.aggregations import kernel_name
from features.catalog import CATALOGS
from features.engine import FeaturePipeline
from features.privacy import card_token, identity
from models.artifact import ModelArtifact, check_schema, load
from models.drift import DriftMonitor, Reference
from models.online import OnlineModel
from models.serving import Scorer
from service import telemetry
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    pipeline: FeaturePipeline
    artifact: ModelArtifact
    redis_url: str

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def threshold(self) -> float:
        s = self.settings
        return self.artifact.threshold if s.threshold is None else s.threshold

    @property
    def card_ref(self) -> Callable[[str], str]:
        """How card ids appear in outputs: tokenized with FRAUD_CARD_TOKEN_KEY, else as they are."""
        key = self.settings.card_token_key
        return identity if key is None else card_token(key.get_secret_value().encode())

    def new_scorer(self) -> Scorer:
        return new_scorer(self.settings, self.artifact)


def new_pipeline(settings: Settings) -> FeaturePipeline:
    return FeaturePipeline(CATALOGS[settings.feature_set], round(settings.allowed_lateness_s * 1000))


def new_online_model(settings: Settings) -> OnlineModel:
    return OnlineModel(
        lr=settings.online_lr,
        l2=settings.online_l2,
        pos_weight=settings.online_pos_weight,
        warmup=settings.online_warmup_labels,
    )


def new_drift_monitor(settings: Settings, artifact: ModelArtifact) -> DriftMonitor | None:
    """The scorer's drift watch (None when `FRAUD_DRIFT_WATCH` is off); data drift only when the
    artifact carries a reference."""
    if not settings.drift_watch:
        return None
    return DriftMonitor(
        None if artifact.reference is None else Reference.from_json(artifact.reference),
        artifact.threshold if settings.threshold is None else settings.threshold,
        window_hours=settings.drift_window_hours,
        psi_threshold=settings.drift_psi_threshold,
        min_rows=settings.drift_min_rows,
        label_window=settings.drift_label_window,
        delta=settings.drift_delta,
    )


def new_scorer(settings: Settings, artifact: ModelArtifact) -> Scorer:
    return Scorer(
        artifact,
        new_online_model(settings),
        threshold=settings.threshold,
        online_weight=settings.online_weight,
        batch_size=settings.scoring_batch_size,
        top_reasons=settings.top_reasons,
        device=settings.xgb_device,
        nthread=settings.xgb_nthread,
        monitor=new_drift_monitor(settings, artifact),
    )


def load_model(settings: Settings, pipeline: FeaturePipeline) -> ModelArtifact:
    """The configured artifact, refused with a clear message if trained on another feature schema."""
    artifact = load(settings.model_path)
    check_schema(artifact, pipeline.schema_hash, pipeline.names)
    return artifact


def load_runtime(settings: Settings | None = None, *, need_redis: bool = True) -> Runtime:
    s = settings or get_settings()
    pipeline = new_pipeline(s)
    artifact = load_model(s, pipeline)
    url = ""
    if need_redis:
        from service.redis_server import redis_url

        url = redis_url(s)
    telemetry.init_labels()
    telemetry.MODEL.info({"version": artifact.version, "schema_hash": artifact.schema_hash[:12]})
    telemetry.FEATURE_ENGINE.info({"kernel": kernel_name()})
    if kernel_name() == "python":
        logger.warning(
            "features._kernel is not built (no C compiler at install?): window features run in pure "
            "Python, slower, same values. Install gcc and reinstall the package to build it."
        )
    return Runtime(s, pipeline, artifact, url)
