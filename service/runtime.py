"""Everything the flow and the CLI resolve from settings: feature pipeline, model, Redis URL."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

from features.aggregations import kernel_name
from features.catalog import CATALOGS
from features.engine import FeaturePipeline
from features.events import Control
from features.privacy import card_token, identity
from models.artifact import MODEL_FILE, ModelArtifact, check_schema, load
from models.drift import DriftMonitor, Reference
from models.online import OnlineModel
from models.registry import RULES_FILE, Registry, file_digest
from models.rules import digest as rules_digest
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
    digest: str = ""  # sha256 of the served model file
    shadow: str | None = None  # the registry's shadow version at start

    @property
    def registry(self) -> Registry:
        return Registry(self.settings.model_registry)

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def threshold(self) -> float:
        s = self.settings
        return self.artifact.threshold if s.threshold is None else s.threshold

    @property
    def command_key(self) -> bytes | None:
        """The key operator commands must be signed with (FRAUD_COMMAND_KEY), or None."""
        key = self.settings.command_key
        return None if key is None else key.get_secret_value().encode()

    @property
    def card_ref(self) -> Callable[[str], str]:
        """How card ids appear in outputs: tokenized with FRAUD_CARD_TOKEN_KEY, else as they are."""
        key = self.settings.card_token_key
        return identity if key is None else card_token(key.get_secret_value().encode())

    def new_scorer(self) -> Scorer:
        registry = self.registry
        scorer = new_scorer(self.settings, self.artifact, registry, self.digest)
        if self.shadow is not None:
            scorer.apply(Control("shadow", self.shadow, registry.digest(self.shadow)))
        rules = registry.rules()
        if rules:
            scorer.apply(Control("rules", RULES_FILE, rules_digest(rules), rules))
        return scorer


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


def new_scorer(
    settings: Settings, artifact: ModelArtifact, registry: Registry | None = None, digest: str = ""
) -> Scorer:
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
        monitor_for=lambda served: new_drift_monitor(settings, served),
        registry=registry,
        digest=digest,
    )


def load_model(settings: Settings, pipeline: FeaturePipeline) -> ModelArtifact:
    """The configured artifact, refused with a clear message if trained on another feature schema."""
    artifact = load(settings.model_path)
    check_schema(artifact, pipeline.schema_hash, pipeline.names)
    return artifact


def served_model(settings: Settings, pipeline: FeaturePipeline) -> tuple[ModelArtifact, str, str | None]:
    """What a flow starting afresh serves: the registry's champion (and shadow) when it has one,
    else FRAUD_MODEL_PATH's artifact; with the model file's digest."""
    registry = Registry(settings.model_registry)
    state = registry.state()
    if state.champion is None:
        artifact = load_model(settings, pipeline)
        return artifact, file_digest(settings.model_path / MODEL_FILE), None
    digest = registry.digest(state.champion)
    artifact = registry.load(state.champion, digest)
    check_schema(artifact, pipeline.schema_hash, pipeline.names)
    if state.shadow is not None:
        check_schema(registry.load(state.shadow), pipeline.schema_hash, pipeline.names)
    return artifact, digest, state.shadow


def load_runtime(settings: Settings | None = None, *, need_redis: bool = True) -> Runtime:
    s = settings or get_settings()
    pipeline = new_pipeline(s)
    artifact, digest, shadow = served_model(s, pipeline)
    url = ""
    if need_redis:
        from service.redis_server import redis_url

        url = redis_url(s)
    telemetry.init_labels()
    telemetry.MODEL.info(
        {"version": artifact.version, "schema_hash": artifact.schema_hash[:12], "shadow": shadow or ""}
    )
    telemetry.FEATURE_ENGINE.info({"kernel": kernel_name()})
    if kernel_name() == "python":
        logger.warning(
            "features._kernel is not built (no C compiler at install?): window features run in pure "
            "Python, slower, same values. Install gcc and reinstall the package to build it."
        )
    return Runtime(s, pipeline, artifact, url, digest, shadow)


YOUNG_COLLECTION_AT = 20_000
"""Container objects allocated (net) before the collector walks the youngest generation: above
what one Bytewax batch (up to `FRAUD_SOURCE_BATCH_SIZE` records) allocates and frees. At Python's
700, the batches themselves set off a collection every few hundred records, and every tenth of
those walks older objects too (`python -m benchmarks.gc_pauses` prints both)."""


def settle_heap() -> None:
    """Before a long run: collect what start-up left, then move every object alive now (settings,
    the loaded model, the built flow; importing `flows.fraud` already froze the modules' objects)
    out of the garbage collector's reach (`gc.freeze`). A full collection then walks only what
    the run itself keeps, instead of pausing the flow to walk every object of every imported
    library. The youngest generation is collected only once
    `YOUNG_COLLECTION_AT` objects outlive their batch (the older thresholds stay Python's)."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_COLLECTION_AT), middle, old)
