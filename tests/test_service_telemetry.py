"""Metrics exposed over HTTP after a run (`service.telemetry`), and the kernel the engine reports."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from bytewax.testing import TestingSink, run_main
from prometheus_client import REGISTRY

from features import aggregations
from features.aggregations import kernel_name
from features.event_files import merged_records
from flows.fraud import build
from service import telemetry
from service.runtime import load_runtime
from service.settings import Settings
from testkit.system import free_port


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_the_run_and_are_scrapable(small_gz: Path) -> None:
    settings = Settings(
        transactions_path=small_gz / "transactions.jsonl.gz",
        labels_path=small_gz / "labels.jsonl.gz",
        drift_window_hours=2,  # short windows and few rows: this small replay sets the drift gauges
        drift_min_rows=20,
        drift_label_window=100,
    )
    telemetry.FEATURE_PSI.clear()
    telemetry.MODEL_QUALITY.clear()
    before = (
        value("fraud_transactions_total"),
        value("fraud_alerts_total"),
        value("fraud_scoring_batch_size_count"),
    )
    alerts: list[dict[str, str]] = []
    sinks = {"dead_letters": TestingSink([]), "late": TestingSink([]), "drift": TestingSink([])}
    run_main(build(settings, alerts=TestingSink(alerts), **sinks))  # no Redis: every sink in memory
    n_txn = sum(
        1 for k, _, _ in merged_records(settings.transactions_path, settings.labels_path) if k == "txn"
    )
    assert value("fraud_transactions_total") - before[0] == n_txn
    assert value("fraud_alerts_total") - before[1] == len(alerts)
    assert value("fraud_scoring_batch_size_count") > before[2]
    assert value("fraud_feature_psi", feature="score") > 0
    assert value("fraud_feature_psi", feature="amount") > 0
    assert 0 < value("fraud_model_quality", model="final", metric="auc") <= 1
    assert 0 < value("fraud_model_quality", model="xgboost", metric="average_precision") <= 1

    port = free_port()
    telemetry.serve(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in (
        "fraud_transactions_total",
        "fraud_alerts_total",
        'fraud_dead_letters_total{kind="txn",reason="bad_json"}',
        "fraud_scoring_batch_seconds_bucket",
        "fraud_end_to_end_latency_seconds_bucket",
        "fraud_model_info",
        'fraud_feature_psi{feature="score"}',
        'fraud_model_quality{metric="auc",model="river"}',
        'fraud_drift_events_total{kind="concept",state="drifting"}',
        f'fraud_feature_engine_info{{kernel="{kernel_name()}"}} 1.0',
    ):
        assert name in body
    # No high-cardinality labels: no card label, no card id value (feature names may say "card_id").
    assert 'card_id="' not in body and "c000" not in body


def test_a_flow_without_the_compiled_kernel_says_so(
    small_gz: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(aggregations, "KERNEL", None)
    settings = Settings(
        transactions_path=small_gz / "transactions.jsonl.gz", labels_path=small_gz / "labels.jsonl.gz"
    )
    with caplog.at_level("WARNING", logger="service.runtime"):
        build(
            settings,
            alerts=TestingSink([]),
            dead_letters=TestingSink([]),
            late=TestingSink([]),
            drift=TestingSink([]),
        )
    assert "features._kernel is not built" in caplog.text
    assert REGISTRY.get_sample_value("fraud_feature_engine_info", {"kernel": "python"}) == 1.0
    assert all(plan.kernel is None for plan in load_runtime(settings, need_redis=False).pipeline.plans)


def test_observe_all_counts_what_observe_counts_one_by_one() -> None:
    """The batch observe the decision counter uses: each amount in the bucket `observe` puts it in
    (an amount on a bound, below the first, infinite, NaN in none), the same count and sum."""
    from prometheus_client import CollectorRegistry, Histogram

    amounts = [0.0, 0.05, 0.050000001, -3.0, 1.0, 2.0, float("inf"), float("nan"), 0.3, 0.3, 0.9999]
    amounts += [i / 97 for i in range(97)]
    registries = [CollectorRegistry(), CollectorRegistry()]
    one, batch = (Histogram("h", "h", buckets=(0.05, 0.3, 1.0), registry=r) for r in registries)
    for a in amounts:
        one.observe(a)
    telemetry.observe_all(batch, amounts[:40])
    telemetry.observe_all(batch, amounts[40:])
    telemetry.observe_all(batch, [])

    def samples(r: CollectorRegistry) -> dict[str, float]:
        return {f"{s.name}{sorted(s.labels.items())}": s.value for m in r.collect() for s in m.samples}

    got, want = samples(registries[1]), samples(registries[0])
    assert got.keys() == want.keys()
    for k in want:
        if k.startswith("h_created"):
            continue  # when each was made
        if k.startswith("h_sum"):  # NaN and inf in the amounts: the sums are NaN either way
            assert f"{got[k]}" == f"{want[k]}" == "nan"
        else:
            assert got[k] == want[k], k
    finite = [a for a in amounts if a == a and abs(a) != float("inf")]
    third = Histogram("h", "h", buckets=(0.5,), registry=CollectorRegistry())
    telemetry.observe_all(third, finite)
    assert third._sum.get() == pytest.approx(sum(finite))  # noqa: SLF001
