"""With FRAUD_CARD_TOKEN_KEY set, no raw card id leaves the decoder: not in any output stream (dead
letters included), not in the recovery store, not in a step's error message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main
from pydantic import SecretStr

from features.engine import FeaturePipeline, FeatureRow
from features.plan import EntityPlan
from features.privacy import card_token, tokenize_raw
from flows.fraud import build
from fraud.datagen import GeneratorConfig, write_files
from service.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

KEY = "test-token-key"
MARK = "CARDNUM"  # every raw card id contains it; no token or other field can


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """Generated traffic with distinctive card ids, plus bad records that carry a card id."""
    out = tmp_path_factory.mktemp("tokens")
    write_files(out, GeneratorConfig(seed=9, days=6, n_cards=60, n_merchants=50, drift_day=None))
    txns = []
    for line in (out / "transactions.jsonl").read_text().splitlines():
        t = json.loads(line)
        t["card_id"] = f"{MARK}{t['card_id']}"
        txns.append(json.dumps(t))
    good = json.loads(txns[200])
    text = json.dumps(good)
    bad = [
        text[: text.index('"card_id"') + 20],  # bad_json, cut inside the card id's string
        json.dumps({**good, "txn_id": "bad-amount", "amount": 1e300}),  # bad_amount
        json.dumps({**good, "txn_id": "bad-schema", "merchant_id": 7}),  # schema
        json.dumps({**good, "txn_id": "bad-num", "card_id": 4111111111111111}),  # schema, a bare number
        txns[300],  # a duplicate: a complete valid transaction, dead-lettered
        json.dumps({**good, "txn_id": "poison"}),  # a step raises on it, naming the card
    ]
    assert f'"card_id": "{MARK}' in bad[0]
    for i, line in enumerate(bad):
        txns.insert(400 + 5 * i, line)
    (out / "transactions.jsonl").write_text("\n".join(txns) + "\n")
    return out / "transactions.jsonl", out / "labels.jsonl", bad


def test_no_raw_card_id_in_streams_snapshots_or_errors(
    data: tuple[Path, Path, list[str]],
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    txns, labels, bad = data
    observe = FeaturePipeline.observe

    def observe_(self: FeaturePipeline, plan: EntityPlan, state: object, row: FeatureRow) -> None:
        if row.txn.txn_id == "poison":  # an error whose message holds the card id it was given
            raise KeyError(f"no state for card {row.txn.card_id}")
        observe(self, plan, state, row)  # type: ignore[arg-type]

    monkeypatch.setattr(FeaturePipeline, "observe", observe_)
    settings = Settings(
        transactions_path=txns,
        labels_path=labels,
        redis_url=redis_url,
        card_token_key=SecretStr(KEY),
        decision_log=True,
        threshold=0.05,
        progress_interval_s=600,
    )
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 2)
    run_main(build(settings), recovery_config=RecoveryConfig(str(recovery)))

    streams = [settings.alerts_stream, settings.dlq_stream, settings.late_stream, settings.decision_stream]
    everything = {s: redis_client.xrange(s) for s in streams}
    assert everything[settings.alerts_stream] and everything[settings.decision_stream]
    for stream, got in everything.items():
        for _, fields in got:
            for value in fields.values():
                assert MARK.encode() not in value, (stream, value[:200])

    tok = card_token(KEY.encode())
    dead = {
        d["txn_id"] or d["reason"]: d
        for d in ({k.decode(): v.decode() for k, v in f.items()} for _, f in everything[settings.dlq_stream])
    }
    assert len(dead) == len(bad)
    # Known fields are tokenized, the rest of the payload is kept as received.
    assert (
        dead["bad_json"]["raw"] == tokenize_raw(bad[0], tok) and '"card_id": "tok_' in dead["bad_json"]["raw"]
    )
    assert dead["bad-num"]["raw"] == bad[3].replace("4111111111111111", f'"{tok("4111111111111111")}"')
    duplicate = json.loads(dead[json.loads(bad[4])["txn_id"]]["raw"])
    assert duplicate == {**json.loads(bad[4]), "card_id": tok(json.loads(bad[4])["card_id"])}
    poison = dead["poison"]
    assert poison["reason"] == "internal_error" and "no state for card tok_" in poison["detail"]
    # Alerts name the card by the token consumers can join on.
    cards = {}
    for line in txns.read_text().splitlines():
        try:
            t = json.loads(line)
        except ValueError:  # the cut-short record
            continue
        cards.setdefault(t["txn_id"], t["card_id"])
    for _, fields in everything[settings.alerts_stream]:
        alert = {k.decode(): v.decode() for k, v in fields.items()}
        assert alert["card_id"] == tok(cards[alert["txn_id"]])

    # The recovery store: state keys, held events and snapshots hold tokens only.
    parts = sorted(recovery.glob("part-*.sqlite3*"))
    assert parts
    for part in parts:
        assert MARK.encode() not in part.read_bytes(), part.name
