"""The quarantine: a record that makes any stateful step raise becomes one `internal_error` dead
letter naming the step, and the flow goes on scoring everything else.

The faults are injected into the real code (the pipeline, the XGBoost scorer) for a few chosen
transactions only: nothing else can make a validated record raise, which is the point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bytewax.testing import TestingSink, run_main

from features.engine import FeaturePipeline, FeatureRow, LabelEvent
from features.events import DeadLetter, Transaction
from features.plan import EntityPlan
from flows.fraud import build
from fraud.datagen import GeneratorConfig, write_files
from models.serving import Decision
from models.xgb import XGBScorer
from service.settings import Settings

pytestmark = [pytest.mark.e2e]

POISON_AMOUNT = 4242.42  # XGBoost raises on any batch holding a row with this amount


class Poisoned(RuntimeError):
    """What the injected faults raise."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, int]:
    out = tmp_path_factory.mktemp("quarantine")
    write_files(out, GeneratorConfig(seed=5, days=8, n_cards=80, n_merchants=60, drift_day=None))
    txns = (out / "transactions.jsonl").read_text().splitlines()
    labels = (out / "labels.jsonl").read_text().splitlines()
    n_txn, n_label = len(txns), len(labels)
    template = json.loads(txns[len(txns) // 2])
    template["device_id"] = "dev-poison"  # every entity present, so every entity step sees them
    poisons = []
    for name in ("index", "card", "merchant", "device", "pending", "score", "label"):
        t = dict(template, txn_id=f"poison-{name}")
        if name == "score":
            t["amount"] = POISON_AMOUNT
        poisons.append(json.dumps(t))
    for i, line in enumerate(poisons):
        txns.insert(len(txns) // 2 + 1 + 3 * i, line)
    later = template["ts"][:10] + "T23:59:00+00:00"
    labels.append(json.dumps({"txn_id": "poison-label", "is_fraud": True, "ts": later}))
    (out / "transactions.jsonl").write_text("\n".join(txns) + "\n")
    (out / "labels.jsonl").write_text("\n".join(labels) + "\n")
    return out / "transactions.jsonl", out / "labels.jsonl", n_txn, n_label


def inject_faults(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the index, each entity step, the pending step, a label in the chain and the scorer
    raise for their own poison record, and only for it; returns the list of faults raised."""
    raised: list[str] = []
    start, observe, observe_label, assemble = (
        FeaturePipeline.start,
        FeaturePipeline.observe,
        FeaturePipeline.observe_label,
        FeaturePipeline.assemble,
    )
    score = XGBScorer.score

    def start_(self: FeaturePipeline, txn: Transaction) -> Any:
        if txn.txn_id == "poison-index":
            raised.append("index fault")
            raise Poisoned("index fault")
        return start(self, txn)

    def observe_(self: FeaturePipeline, plan: EntityPlan, state: Any, row: FeatureRow) -> None:
        if row.txn.txn_id == f"poison-{plan.entity.name}":
            raised.append(f"{plan.entity.name} fault")
            raise Poisoned(f"{plan.entity.name} fault")
        observe(self, plan, state, row)

    def observe_label_(self: FeaturePipeline, plan: EntityPlan, state: Any, label: LabelEvent) -> None:
        if label.txn_id == "poison-label":
            raised.append("label fault")
            raise Poisoned("label fault")
        observe_label(self, plan, state, label)

    def assemble_(self: FeaturePipeline, row: FeatureRow) -> list[float]:
        if row.txn.txn_id == "poison-pending":
            raised.append("pending fault")
            raise Poisoned("pending fault")
        return assemble(self, row)

    def score_(self: XGBScorer, X: np.ndarray) -> np.ndarray:
        if np.any(X[:, 0] == np.float32(POISON_AMOUNT)):
            raised.append("xgboost fault")
            raise Poisoned("xgboost fault")
        return score(self, X)

    monkeypatch.setattr(FeaturePipeline, "start", start_)
    monkeypatch.setattr(FeaturePipeline, "observe", observe_)
    monkeypatch.setattr(FeaturePipeline, "observe_label", observe_label_)
    monkeypatch.setattr(FeaturePipeline, "assemble", assemble_)
    monkeypatch.setattr(XGBScorer, "score", score_)
    return raised


def run(settings: Settings) -> tuple[list[Decision], list[DeadLetter]]:
    decisions: list[Decision] = []
    dead: list[dict[str, str | bytes]] = []
    flow = build(
        settings,
        decisions=TestingSink(decisions),
        alerts=TestingSink([]),
        dead_letters=TestingSink(dead),
        late=TestingSink([]),
    )
    run_main(flow)
    text = [{k: v.decode() if isinstance(v, bytes) else v for k, v in d.items()} for d in dead]
    return decisions, [
        DeadLetter(d["kind"], d["reason"], d["detail"], d["raw"], d["txn_id"] or None) for d in text
    ]


def test_a_poison_record_in_any_step_is_dead_lettered_and_the_flow_goes_on(
    data: tuple[Path, Path, int, int], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    txns, labels, n_txn, n_label = data
    settings = Settings(
        transactions_path=txns, labels_path=labels, redis_url=redis_url, progress_interval_s=600
    )
    clean, clean_dead = run(settings)
    assert clean_dead == [] and len(clean) == n_txn + 7  # without faults, the poisons are ordinary

    inject_faults(monkeypatch)
    decisions, dead = run(settings)
    steps = {
        "poison-index": "index",
        "poison-card": "card_features",
        "poison-merchant": "merchant_features",
        "poison-device": "device_features",
        "poison-pending": "pending",
        "poison-score": "score",
    }
    by_txn = {(d.kind, d.txn_id): d for d in dead}
    assert len(dead) == len(by_txn) == len(steps) + 1, [(d.txn_id, d.detail) for d in dead]
    for txn_id, step in steps.items():
        d = by_txn["txn", txn_id]
        assert d.reason == "internal_error" and d.detail.startswith(f"step {step!r} raised Poisoned")
        assert json.loads(d.raw)["txn_id"] == txn_id  # the payload as received
    label = by_txn["label", "poison-label"]
    assert label.reason == "internal_error" and "card_features" in label.detail
    assert json.loads(label.raw) == {
        "txn_id": "poison-label",
        "is_fraud": True,
        "ts": json.loads(label.raw)["ts"],
    }

    # Everything else was scored, once: the poison-label transaction itself is fine, only its label failed.
    scored = [d.txn.txn_id for d in decisions]
    assert len(scored) == len(set(scored)) == n_txn + 1
    assert not set(scored) & set(steps)
    # Accounting: records in = scored + dead letters + labels that reached the scorer's join.
    assert n_txn + 7 + n_label + 1 == len(decisions) + len(dead) + n_label


def test_a_batch_scoring_failure_costs_only_the_poisoned_row(
    data: tuple[Path, Path, int, int], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scorer scores in batches: the failed batch call is retried row by row, so the rows
    around the poisoned one keep exactly the scores they get without it."""
    txns, labels, _, _ = data
    settings = Settings(
        transactions_path=txns, labels_path=labels, redis_url=redis_url, progress_interval_s=600
    )
    clean = {d.txn.txn_id: d.score for d in run(settings)[0]}
    score = XGBScorer.score

    def score_(self: XGBScorer, X: np.ndarray) -> np.ndarray:
        if np.any(X[:, 0] == np.float32(POISON_AMOUNT)):
            raise Poisoned("xgboost fault")
        return score(self, X)

    monkeypatch.setattr(XGBScorer, "score", score_)
    decisions, dead = run(settings)
    assert [d.txn_id for d in dead] == ["poison-score"]
    got = {d.txn.txn_id: d.score for d in decisions}
    assert set(clean) - set(got) == {"poison-score"}
    assert all(got[t] == clean[t] for t in got)


@pytest.mark.redis
def test_after_a_restart_the_poison_record_is_not_met_again(
    data: tuple[Path, Path, int, int], redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With recovery: the first run quarantines the poison records and goes on; the restarted run
    resumes after them (no second dead letter, no crash loop) and scores what came since."""
    import redis as redis_lib
    from bytewax.recovery import RecoveryConfig, init_db_dir

    txns, labels, n_txn, _ = data
    mine = tmp_path / "transactions.jsonl"
    lines = txns.read_text().splitlines()
    mine.write_text("\n".join(lines) + "\n")
    settings = Settings(
        transactions_path=mine,
        labels_path=labels,
        redis_url=redis_url,
        progress_interval_s=600,
        decision_log=True,
        alerts_stream="q:alerts",
        dlq_stream="q:dlq",
        late_stream="q:late",
        decision_stream="q:decisions",
    )
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    raised = inject_faults(monkeypatch)
    client = redis_lib.Redis.from_url(redis_url)
    run_main(build(settings), recovery_config=RecoveryConfig(str(recovery)))
    first = client.xlen("q:dlq")
    assert first == 7 and client.xlen("q:decisions") == n_txn + 1
    faults = len(raised)
    assert faults >= 7

    later = json.loads(lines[-1])
    extra = [json.dumps(dict(later, txn_id=f"after-{i}", ts=later["ts"])) for i in range(5)]
    mine.write_text("\n".join(lines + extra) + "\n")
    run_main(build(settings), recovery_config=RecoveryConfig(str(recovery)))
    assert len(raised) == faults  # the poison records were not met again
    assert client.xlen("q:dlq") == first
    decided = [f[b"txn_id"].decode() for _, f in client.xrange("q:decisions")]
    # The first run read its file to the end (a final watermark past everything), so the lines
    # appended later are applied as they come, in no promised order among themselves.
    assert len(decided) == len(set(decided)) == n_txn + 1 + 5
    assert sorted(decided[-5:]) == [f"after-{i}" for i in range(5)]


def test_what_a_quarantined_record_says_whatever_step_held_it(caplog: pytest.LogCaptureFixture) -> None:
    """Each kind of record a step may hold becomes the dead letter closest to what was received:
    its kind, the internal error, its raw payload, transaction id and origin."""
    import logging

    from features.events import Control, Label
    from flows.steps import quarantine
    from models.serving import LabelledVector

    boom = RuntimeError("boom")
    txn = Transaction("t1", 1_767_600_000_000, "c1", "m1", 5.0, raw='{"txn_id":"t1"}', origin="in:{0}#1-0")
    label = Label("t2", True, 1_767_600_000_000, raw='{"txn_id":"t2","is_fraud":true}', origin="labels#7-0")
    joined = LabelEvent("t3", False, 1_767_600_000_000, 1_767_500_000_000, ("c1",), origin="labels#8-0")
    vector = LabelledVector("t4", True, np.zeros(2, dtype=np.float32), 9, 0)
    command = Control("champion", "v2", "d", raw='{"command":"champion"}', origin="control#1-0")
    got = [quarantine(it, "card", boom).dead for it in (txn, label, joined, vector, command, 42)]
    assert [(d.kind, d.reason, d.txn_id, d.origin) for d in got] == [
        ("txn", "internal_error", "t1", "in:{0}#1-0"),
        ("label", "internal_error", "t2", "labels#7-0"),
        ("label", "internal_error", "t3", "labels#8-0"),
        ("label", "internal_error", "t4", ""),
        ("control", "bad_control", None, "control#1-0"),
        ("unknown", "internal_error", None, ""),
    ]
    assert [d.raw for d in got[:2]] == [txn.raw, label.raw] and got[4].raw == command.raw
    assert json.loads(got[2].raw)["txn_id"] == "t3" and json.loads(got[3].raw) == {
        "txn_id": "t4",
        "is_fraud": True,
    }
    assert got[5].raw == "42" and all(d.detail == "step 'card' raised RuntimeError: boom" for d in got)
    # The log: the first failure of a (step, exception type), then one line every 1,000.
    with caplog.at_level(logging.ERROR, logger="flows.steps"):
        for _ in range(2_000):
            quarantine(txn, "cadence_test", ValueError("again"))
    counts = [r.args[-1] for r in caplog.records if "cadence_test" in r.getMessage()]  # type: ignore[index]
    assert counts == [1, 1000, 2000]
    # The line names the step, the exception and the transaction (its id cut at 64 characters, "?"
    # for a record without one); the record itself carries no entity keys.
    caplog.clear()
    long_id = Transaction("x" * 100, 1_767_600_000_000, "c1", "m1", 5.0)
    with caplog.at_level(logging.ERROR, logger="flows.steps"):
        assert quarantine(long_id, "line_test", KeyError("k")).keys == ()
        quarantine(42, "line_test_2", KeyError("k"))
    assert [r.getMessage() for r in caplog.records] == [
        f"step 'line_test' raised KeyError on transaction '{'x' * 64}' (1 so far): the record goes to "
        "the dead letters (internal_error) and the flow goes on",
        "step 'line_test_2' raised KeyError on transaction '?' (1 so far): the record goes to the dead "
        "letters (internal_error) and the flow goes on",
    ]
