"""Model versions: the registry, commands in the input, the scorer switching at their place, shadow
scores, `fraud model`, and the flow swapping models mid-stream (1 = N processes, SIGKILL inside
the swap) against a real Redis."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from features.engine import FeatureEngine, FeatureVector
from features.event_files import replay
from features.events import Control, decode
from fraud.cli import app
from fraud.datagen import GeneratorConfig, write_files
from fraud.decision_log import stream_labels
from fraud.model_commands import send_command
from models.artifact import ArtifactError, load, save
from models.evaluation import average_precision
from models.registry import Registry, RegistryState
from models.rules import digest as rules_digest
from models.serving import Scorer
from models.xgb import XGBScorer, positive_weight
from service.redis_client import connect
from service.runtime import load_runtime, new_drift_monitor, new_online_model, new_scorer
from service.settings import Settings, get_settings
from testkit import drill
from testkit.streams import entries
from testkit.system import free_port

DEFAULT = Path("models/artifacts/default")
V1 = load(DEFAULT).version
V2 = "xgb-20261202000000-" + V1.rsplit("-", 1)[1]  # the same schema, fewer trees, its own threshold


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second version of the default model: its first 20 trees, alerting at 0.3."""
    base = load(DEFAULT)
    out = tmp_path_factory.mktemp("v2") / "artifact"
    save(dataclasses.replace(base, version=V2, booster=base.booster[0:20], threshold=0.3), out)
    return out


@pytest.fixture
def registry(tmp_path: Path, v2_dir: Path) -> Registry:
    reg = Registry(tmp_path / "registry")
    assert reg.add(DEFAULT) == V1 and reg.add(v2_dir) == V2
    return reg


@pytest.fixture(scope="module")
def vectors() -> list[FeatureVector]:
    s = Settings()
    rt = load_runtime(s, need_redis=False)
    out = FeatureEngine(rt.pipeline).run(replay(s.transactions_path, None))
    return [v for v, _ in zip((o for o in out if isinstance(o, FeatureVector)), range(900), strict=False)]


def xgb_of(artifact_dir: Path, rows: list[list[float]]) -> np.ndarray:
    a = load(artifact_dir)
    scorer = XGBScorer(a.booster, a.feature_names, positive_weight=positive_weight(a.params))
    return scorer.score(np.asarray(rows, dtype=np.float32))


# --- the registry ------------------------------------------------------------------------------


def test_the_registry_keeps_each_version_as_added_and_checks_digests(
    registry: Registry, v2_dir: Path, tmp_path: Path
) -> None:
    assert registry.versions() == [V1, V2]
    assert registry.add(v2_dir) == V2  # the same files again: nothing changes
    other = tmp_path / "other"
    a = load(v2_dir)
    save(dataclasses.replace(a, booster=a.booster[0:5]), other)
    with pytest.raises(ArtifactError, match="already registered with another model"):
        registry.add(other)
    with pytest.raises(ArtifactError, match="registry differs between machines"):
        registry.load(V2, "0" * 64)
    with pytest.raises(ArtifactError, match="not in the registry"):
        registry.digest("xgb-19990101000000-00000000")
    with pytest.raises(ArtifactError, match="not a version name"):
        registry.path("../escape")
    assert registry.state() == RegistryState()
    registry.save_state(RegistryState(V2, V1, [V1, V2]))
    assert registry.state() == RegistryState(V2, V1, [V1, V2])


# --- the scorer --------------------------------------------------------------------------------


def command(registry: Registry, what: str, version: str = "") -> Control:
    return Control(what, version, registry.digest(version) if version else "")


def test_the_scorer_switches_at_each_command_and_a_snapshot_resumes_what_it_served(
    registry: Registry, vectors: list[FeatureVector], v2_dir: Path
) -> None:
    """Vectors before a command are decided as before it; a shadow scores every vector after
    `shadow` with its own model and threshold without changing the decision; after `champion`
    the new version decides, at its own threshold; a snapshot resumes champion and shadow."""
    s = Settings(model_registry=registry.root, threshold=None)
    alone = load_runtime(s, need_redis=False).new_scorer().decide(vectors)  # V1 throughout
    scorer = load_runtime(s, need_redis=False).new_scorer()
    a, b, c = vectors[:300], vectors[300:600], vectors[600:]
    got = scorer.decide([*a, command(registry, "shadow", V2), *b, command(registry, "champion", V2), *c])
    assert [x.command for x in scorer.last.applied] == ["shadow", "champion"] and not scorer.last.failed
    assert len(got) == len(vectors)
    v2_scores = xgb_of(v2_dir, [v.values for v in vectors])
    for i, (d, ref) in enumerate(zip(got, alone, strict=True)):
        if i < 300:
            assert (d.version, d.xgb, d.score, d.alert, d.shadow) == (V1, ref.xgb, ref.score, ref.alert, None)
        elif i < 600:
            assert (d.version, d.xgb, d.score, d.alert) == (V1, ref.xgb, ref.score, ref.alert)
            assert d.shadow is not None and d.shadow.version == V2
            assert math.isclose(d.shadow.xgb, float(v2_scores[i]), rel_tol=1e-6)
            assert d.shadow.alert == (d.shadow.score >= 0.3)
        else:
            assert d.version == V2 and d.threshold == 0.3 and d.alert == (d.score >= 0.3)
            assert math.isclose(d.xgb, float(v2_scores[i]), rel_tol=1e-6)
    assert any(d.xgb != r.xgb for d, r in zip(got[600:], alone[600:], strict=True))
    resumed = load_runtime(s, need_redis=False).new_scorer()
    assert resumed.champion.version == V1
    resumed.restore(scorer.snapshot())
    assert resumed.champion.version == V2 and resumed.shadow is not None and resumed.shadow.version == V2
    assert [d.score for d in resumed.decide(c)] == [d.score for d in scorer.decide(c)]


def test_a_shadow_score_exactly_at_the_shadow_threshold_is_a_shadow_alert(
    registry: Registry, vectors: list[FeatureVector]
) -> None:
    """The shadow's threshold is, like the champion's, the lowest alerting score: set it to a
    vector's exact shadow score and that vector is a shadow alert; a hair above, it is not."""
    scorer = load_runtime(Settings(model_registry=registry.root), need_redis=False).new_scorer()
    batch = vectors[:200]
    first = scorer.decide([command(registry, "shadow", V2), *batch])
    shadow = scorer.shadow
    assert shadow is not None and not scorer.last.failed
    scores = sorted({d.shadow.score for d in first if d.shadow is not None and 0.01 < d.shadow.score < 0.99})
    at = scores[len(scores) // 2]
    for threshold, alerts in ((at, True), (at + 1e-12, False)):
        shadow.threshold = threshold
        again = scorer.decide(batch)
        exactly = [d.shadow for d in again if d.shadow is not None and d.shadow.score == at]
        assert exactly and all(s.alert is alerts for s in exactly)


def test_a_refused_command_changes_nothing(
    registry: Registry, vectors: list[FeatureVector], tmp_path: Path
) -> None:
    s = Settings(model_registry=registry.root)
    scorer = load_runtime(s, need_redis=False).new_scorer()
    before = [d.score for d in scorer.decide(vectors[:50])]
    other_schema = tmp_path / "other-schema"
    a = load(DEFAULT)
    save(dataclasses.replace(a, version="xgb-20261203000000-aaaaaaaa", schema_hash="a" * 64), other_schema)
    registry.add(other_schema)
    bad = [
        Control("champion", "xgb-19990101000000-00000000", "0" * 64),  # not registered
        Control("champion", V2, "0" * 64),  # another model than the command named
        command(registry, "champion", "xgb-20261203000000-aaaaaaaa"),  # another feature schema
        Control("rules", "x", "y"),  # not the scorer's (yet)
    ]
    got = scorer.decide([*bad, *vectors[:50]])
    assert "not in the registry" in str(scorer.last.failed[0][1])
    assert "the command named" in str(scorer.last.failed[1][1])  # another digest
    assert [it for it, _ in scorer.last.failed] == bad and not scorer.last.applied
    assert (
        str(scorer.last.failed[2][1])
        == (  # both schemas named by their first 12 hex digits
            f"model xgb-20261203000000-aaaaaaaa was trained on feature schema {'a' * 12}, the flow "
            f"computes {a.schema_hash[:12]}"
        )
    )
    assert [d.score for d in got] == before and {d.version for d in got} == {V1}


def test_a_scorer_without_a_registry_or_a_drift_factory_says_so_or_serves_on(
    registry: Registry, vectors: list[FeatureVector]
) -> None:
    """Built by hand (no registry): a command naming a model is refused, saying why. Built with a
    registry but no drift-watch factory: a new champion is served, its drift watch kept."""
    s = Settings(model_registry=registry.root)
    artifact = load(DEFAULT)
    bare = new_scorer(s, artifact)
    bare.decide([command(registry, "champion", V2), *vectors[:5]])
    assert [str(e) for _, e in bare.last.failed] == [f"model {V2} was named, but this scorer has no registry"]
    plain = Scorer(artifact, new_online_model(s), registry=registry, monitor=new_drift_monitor(s, artifact))
    watch = plain.monitor
    plain.decide([command(registry, "champion", V2), *vectors[:5]])
    assert not plain.last.failed and plain.champion.version == V2 and plain.monitor is watch


def test_commands_decode_and_bad_ones_are_dead_letters() -> None:
    ok = decode("control", '{"command": "champion", "version": "v", "digest": "d"}', origin="s#1-0")
    assert isinstance(ok, Control) and (ok.command, ok.version, ok.txn_id) == (
        "champion",
        "v",
        "~control:s#1-0",
    )
    off = decode("control", '{"command": "shadow"}')
    assert isinstance(off, Control) and off.version == ""
    for raw in ('{"command": "champion"}', '{"command": "explode"}', "{", '{"command": "shadow", "x": 1}'):
        dead = decode("control", raw)
        assert not isinstance(dead, Control) and (dead.kind, dead.reason) == ("control", "bad_control"), raw


# --- fraud model ------------------------------------------------------------------------------


def test_fraud_model_commands_write_to_the_input_and_keep_the_state(
    v2_dir: Path, redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FRAUD_SOURCE", "redis")
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    monkeypatch.setenv("FRAUD_INPUT_STREAM", "lc:in")
    root = tmp_path / "model-registry"
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> str:
        out = runner.invoke(app, ["model", *args])
        assert (out.exit_code == 0) == ok, out.output
        return out.output

    assert "no versions" in run("list")
    assert "registered " + V2 in run("add", str(v2_dir))
    assert "not in the registry" in run("promote", "xgb-19990101000000-00000000", ok=False)
    assert "nothing to roll back" in run("rollback", ok=False)  # registers the served model first
    assert Registry(root).state() == RegistryState(V1, None, [V1])
    run("shadow", V2)
    run("promote", V2)  # the shadow becomes the champion: shadowing it stops
    assert Registry(root).state() == RegistryState(V2, None, [V1, V2])
    run("rollback")
    assert Registry(root).state() == RegistryState(V1, None, [V1])
    listed = json.loads(run("list", "--json"))
    assert [(v["version"], v["role"]) for v in listed["versions"]] == [(V1, "champion"), (V2, "")]
    sent = [json.loads(e["payload"]) for e in entries(redis_client, "lc:in:{0}")]
    assert all(e["kind"] == "control" for e in entries(redis_client, "lc:in:{0}"))
    digest = Registry(root).digest(V2)
    assert [(p["command"], p["version"]) for p in sent] == [
        ("shadow", V2), ("champion", V2), ("shadow", ""), ("champion", V1),
    ]  # fmt: skip
    assert sent[1]["digest"] == digest
    assert "give a VERSION or --off" in run("shadow", ok=False)


# --- the flow ---------------------------------------------------------------------------------

RUN = {
    "FRAUD_SOURCE_BATCH_SIZE": "100",
    "FRAUD_SNAPSHOT_INTERVAL_S": "0.05",
    "FRAUD_DECISION_LOG": "1",
    "FRAUD_ONLINE_WARMUP_LABELS": "100",
    "FRAUD_COMMAND_KEY": "lifecycle-key",
}
HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def thirds(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[Path, Path]], list[int]]:
    """A generated world cut in three periods of event time (transactions and labels)."""
    out = tmp_path_factory.mktemp("lc-data")
    write_files(out, GeneratorConfig(seed=21, days=12, n_cards=150, n_merchants=50, drift_day=None))
    txns = (out / "transactions.jsonl").read_text().splitlines()
    labels = (out / "labels.jsonl").read_text().splitlines()

    def ts(line: str) -> int:
        return int(datetime.fromisoformat(json.loads(line)["ts"]).timestamp() * 1000)

    first, last = ts(txns[0]), ts(txns[-1])
    cuts = [first + (last - first) // 3, first + 2 * (last - first) // 3]
    parts = []
    for i, (lo, hi) in enumerate(((0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], 1 << 62))):
        t, lab = out / f"t{i}.jsonl", out / f"l{i}.jsonl"
        t.write_text("".join(x + "\n" for x in txns if lo <= ts(x) < hi))
        lab.write_text("".join(x + "\n" for x in labels if lo <= ts(x) < hi))
        parts.append((t, lab))
    return parts, cuts


RULES_B = """# sent with the shadow
big: amount > 500 -> review
watch: amount > 100 -> alert dry-run
"""
ALLOW_ALL = "everything: amount >= 0 -> allow\n"
RULES_C = "trusted: amount < 50 -> allow\nbig: amount > 300 -> review\n"


def fill(url: str, thirds: tuple[list[tuple[Path, Path]], list[int]], tag: str, registry: Path) -> int:
    """The input of a flow that starts serving V1 without rules and reads: the first period,
    `shadow V2` and rule set B, the second period, `promote V2` and rule set C, the third (the
    commands as `fraud model` and `fraud rules` send them, signed), and a forged command (unsigned:
    it must change nothing)."""
    client = connect(url)
    s = Settings(
        source="redis", redis_url=url, input_stream=f"{tag}:in", model_registry=registry,
        command_key=RUN["FRAUD_COMMAND_KEY"],
    )  # fmt: skip
    forged = Settings(source="redis", redis_url=url, input_stream=f"{tag}:in")
    reg = Registry(registry)
    reg.add(DEFAULT)
    n = drill.replay(client, thirds[0][0], tag, 2)
    send_command(s, "shadow", V2, reg.digest(V2))
    send_command(s, "rules", "b.rules", rules_digest(RULES_B), RULES_B)
    send_command(forged, "rules", "evil", rules_digest(ALLOW_ALL), ALLOW_ALL)
    n += drill.replay(client, thirds[0][1], tag, 2)
    send_command(s, "champion", V2, reg.digest(V2))
    send_command(s, "shadow")
    send_command(s, "rules", "c.rules", rules_digest(RULES_C), RULES_C)
    n += drill.replay(client, thirds[0][2], tag, 2)
    client.close()
    return n


def judged(client: redis.Redis, env: dict[str, str]) -> dict[str, Any]:
    """`fraud evaluate --from-decisions` in the environment of a run."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            if name.startswith("FRAUD_"):
                mp.setenv(name, value)
        get_settings.cache_clear()
        out = CliRunner().invoke(app, ["evaluate", "--from-decisions"])
        get_settings.cache_clear()
    assert out.exit_code == 0, out.output
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def outcome(client: redis.Redis, tag: str) -> dict[str, tuple[str, ...]]:
    return {
        e["txn_id"]: (
            e["ts"],
            e["model_version"],
            e["score"],
            e.get("shadow_version", ""),
            e.get("shadow_score", ""),
            e["action"],
            e.get("rules", ""),
        )
        for e in entries(client, f"{tag}:decisions")
    }


@pytest.mark.redis
@pytest.mark.e2e
def test_the_flow_swaps_models_mid_stream_alike_in_one_or_two_processes_and_across_a_crash(
    thirds: tuple[list[tuple[Path, Path]], list[int]],
    v2_dir: Path,
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """Each period is decided by the model its commands say (the last hour before each command
    aside: there the two shards interleave by their own order), alerts carry their version; a
    two-process cluster and a run SIGKILLed just before and just after the promotion decide every
    transaction once, exactly as one uninterrupted process."""

    def env(tag: str, **kw: str) -> dict[str, str]:
        registry = tmp_path / f"{tag}-registry"
        Registry(registry).add(v2_dir)
        return drill.flow_env(redis_url, tag, 2, tmp_path, FRAUD_MODEL_REGISTRY=str(registry), **RUN, **kw)

    base_env = env("one")
    n = fill(redis_url, thirds, "one", Path(base_env["FRAUD_MODEL_REGISTRY"]))
    drill.finish(drill.start(base_env))
    expected = outcome(redis_client, "one")
    assert len(expected) == n
    cuts = thirds[1]
    amounts = {
        json.loads(line)["txn_id"]: json.loads(line)["amount"]
        for t, _ in thirds[0]
        for line in t.read_text().splitlines()
    }
    seen_actions: dict[str, set[str]] = {"a": set(), "b": set(), "c": set()}
    for txn_id, (ts, version, _, shadow, _, action, rules) in expected.items():
        t = int(datetime.fromisoformat(ts).timestamp() * 1000)
        amount, hits = amounts[txn_id], [h["rule"] for h in json.loads(rules or "[]")]
        if t < cuts[0] - HOUR_MS:
            assert (version, shadow, hits) == (V1, "", []) and action in ("alert", "none")
            seen_actions["a"].add(action)
        elif cuts[0] <= t < cuts[1] - HOUR_MS:
            assert (version, shadow) == (V1, V2)
            assert hits == [r for r, hit in (("big", amount > 500), ("watch", amount > 100)) if hit]
            assert action == "alert" or (action == "review") == (amount > 500)
            seen_actions["b"].add(action)
        elif t >= cuts[1]:
            assert (version, shadow) == (V2, "")
            assert hits == [r for r, hit in (("trusted", amount < 50), ("big", amount > 300)) if hit]
            assert (action == "allow") == (amount < 50)
            seen_actions["c"].add(action)
    assert seen_actions == {
        "a": {"alert", "none"},
        "b": {"alert", "none", "review"},
        "c": {"alert", "none", "allow", "review"},
    }
    alerts = entries(redis_client, "one:alerts")
    assert {a["model_version"] for a in alerts} == {V1, V2}
    assert all(float(a["threshold"]) == 0.3 for a in alerts if a["model_version"] == V2)
    reviews = [a for a in alerts if a["action"] == "review"]
    assert reviews and all({"rule": "big", "action": "review"} in json.loads(a["reasons"]) for a in reviews)
    assert not any("watch" in a["reasons"] for a in alerts)  # a dry-run rule only counts
    assert not any(amounts[a["txn_id"]] < 50 for a in alerts if a["model_version"] == V2)

    compared = judged(redis_client, base_env)
    assert list(compared["champions"]) == [V1, V2] and len(compared["shadows"]) == 1
    pair = compared["shadows"][0]
    assert (pair["champion"], pair["challenger"]) == (V1, V2) and pair["positives"] > 0
    labels = stream_labels(redis_client, "one:in", 2)
    shadowed = [
        e for e in entries(redis_client, "one:decisions") if e.get("shadow_version") and e["txn_id"] in labels
    ]
    assert pair["n"] == len(shadowed)
    y = [labels[e["txn_id"]][0] for e in shadowed]
    assert pair["challenger_final"]["ap"] == average_precision(
        y, [float(e["shadow_score"]) for e in shadowed]
    )
    assert pair["champion_final"]["ap"] == average_precision(y, [float(e["score"]) for e in shadowed])

    crash_env = env("crash")
    fill(redis_url, thirds, "crash", Path(crash_env["FRAUD_MODEL_REGISTRY"]))
    for share in (0.6, 0.7):  # the promotion sits at about two thirds of the input
        drill.kill_when(drill.start(crash_env), lambda s=share: redis_client.xlen("crash:decisions") >= s * n)
        assert redis_client.xlen("crash:decisions") < n
    drill.finish(drill.start(crash_env))
    assert outcome(redis_client, "crash") == expected
    assert redis_client.xlen("crash:decisions") == n  # nothing written twice

    pair_env = env("pair", FRAUD_RECOVERY_PARTITIONS="2")
    fill(redis_url, thirds, "pair", Path(pair_env["FRAUD_MODEL_REGISTRY"]))
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    drill.finish_all([drill.start(pair_env, "-i", str(i), "-a", addresses) for i in range(2)])
    assert outcome(redis_client, "pair") == expected
    assert redis_client.xlen("pair:decisions") == n
    for tag in ("one", "crash", "pair"):  # the forged command, refused at the edge, once
        dead = entries(redis_client, f"{tag}:dlq")
        assert [(d["kind"], d["reason"]) for d in dead] == [("control", "bad_control")], tag
        assert "not signed with FRAUD_COMMAND_KEY" in dead[0]["detail"]


# --- rules -------------------------------------------------------------------------------------


def rules_command(text: str, name: str = "test.rules") -> Control:
    return Control("rules", name, rules_digest(text), text)


def test_rules_apply_from_their_command_and_a_refused_set_keeps_the_running_one(
    registry: Registry, vectors: list[FeatureVector]
) -> None:
    s = Settings(model_registry=registry.root, threshold=0.001)  # the model alerts on some
    alone = load_runtime(s, need_redis=False).new_scorer().decide(vectors[:400])
    assert any(d.alert for d in alone[100:200]) and not all(d.alert for d in alone[100:200])
    scorer = load_runtime(s, need_redis=False).new_scorer()
    allow_all, alert_all = (
        "all: amount >= 0 -> allow\n",
        "all: amount >= 0 -> alert\nbig: amount > 200 -> review dry-run\n",
    )
    got = scorer.decide(
        [
            *vectors[:100],
            rules_command(allow_all),
            *vectors[100:200],
            rules_command("oops: amout > 1 -> alert\n"),  # refused: the set in force stays
            Control("rules", "x", "0" * 64, alert_all),  # refused: not the text its digest names
            *vectors[200:300],
            rules_command(alert_all),
            *vectors[300:400],
        ]
    )
    assert [str(e).splitlines()[-1] for _, e in scorer.last.failed] == [
        "test.rules: line 1: unknown name 'amout' (did you mean 'amount'?)",
        "the rule text does not match the digest its command names",
    ]
    for d, ref in zip(got[:100], alone[:100], strict=True):
        assert (d.alert, d.action, d.hits) == (ref.alert, "alert" if ref.alert else "none", [])
    for d in got[100:300]:  # the model's alerts suppressed: an allow-list for everything
        assert (d.alert, d.action, [h.rule for h in d.hits]) == (False, "allow", ["all"])
    for d in got[300:]:  # every transaction alerts, with the model's reasons; the dry-run rule only counts
        assert d.alert and d.action == "alert" and d.reasons
        assert [(h.rule, h.dry_run) for h in d.hits] == [("all", False)] + (
            [("big", True)] if d.txn.amount > 200 else []
        )
    assert [d.score for d in got] == [d.score for d in alone]  # rules never change a score
    resumed = load_runtime(s, need_redis=False).new_scorer()
    resumed.restore(scorer.snapshot())
    assert resumed.rules is not None and resumed.rules.text == alert_all
    scorer.decide([rules_command("")])
    assert scorer.rules is None and load_runtime(s, need_redis=False).new_scorer().rules is None


def test_fraud_rules_check_load_show_off(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FRAUD_SOURCE", "redis")
    monkeypatch.setenv("FRAUD_REDIS_URL", redis_url)
    monkeypatch.setenv("FRAUD_INPUT_STREAM", "rl:in")
    good, bad = tmp_path / "good.rules", tmp_path / "bad.rules"
    good.write_text("# review big ones\nbig: amount > 2000 and count_by_card_1h >= 5 -> review\n")
    bad.write_text("ok: amount > 1 -> alert\nbad: amount > 'x' -> alert\nworse: -> nothing\n")
    runner = CliRunner()
    out = runner.invoke(app, ["rules", "check", str(good)])
    assert (
        out.exit_code == 0 and "line 2: big: amount > 2000 and count_by_card_1h >= 5 -> review" in out.output
    )
    refused = runner.invoke(app, ["rules", "load", str(bad)])
    assert refused.exit_code == 2 and "refused, nothing changed" in refused.stderr
    assert "line 2:" in refused.stderr and "line 3:" in refused.stderr and "line 1:" not in refused.stderr
    assert redis_client.exists("rl:in:{0}") == 0  # nothing sent
    assert runner.invoke(app, ["rules", "load", str(good)]).exit_code == 0
    assert runner.invoke(app, ["rules", "show"]).output == good.read_text()
    assert load_runtime(need_redis=False).new_scorer().rules is not None  # a fresh start serves it
    assert runner.invoke(app, ["rules", "off"]).exit_code == 0
    assert "no rules in force" in runner.invoke(app, ["rules", "show"]).output
    sent = [json.loads(e["payload"]) for e in entries(redis_client, "rl:in:{0}")]
    assert [(p["command"], p["version"], p.get("text", "")) for p in sent] == [
        ("rules", "good.rules", good.read_text()),
        ("rules", "off", ""),
    ]
    assert sent[0]["digest"] == rules_digest(good.read_text())


def test_a_refused_command_is_a_dead_letter_saying_why(
    registry: Registry, vectors: list[FeatureVector]
) -> None:
    from prometheus_client import REGISTRY

    from features.events import DeadLetter
    from flows.steps import ScoringLogic

    def count(result: str) -> float:
        return (
            REGISTRY.get_sample_value("fraud_model_commands_total", {"command": "champion", "result": result})
            or 0.0
        )

    rt = load_runtime(Settings(model_registry=registry.root), need_redis=False)
    step = ScoringLogic(rt.new_scorer, None)
    refused, applied = count("refused"), count("applied")
    raw = json.dumps({"command": "champion", "version": "xgb-19990101000000-00000000", "digest": "0" * 64})
    bad = decode("control", raw, origin="in:{0}#5-0")
    good = command(registry, "champion", V2)
    out = step.apply([*vectors[:5], bad, *vectors[5:10], good, *vectors[10:15]])
    dead = [o for o in out if isinstance(o, DeadLetter)]
    assert len(dead) == 1 and (dead[0].kind, dead[0].reason, dead[0].raw) == ("control", "bad_control", raw)
    assert "not in the registry" in dead[0].detail and dead[0].origin == "in:{0}#5-0"
    assert (count("refused"), count("applied")) == (refused + 1, applied + 1)
    versions = [o.version for o in out if not isinstance(o, DeadLetter)]
    assert versions == [V1] * 10 + [V2] * 5


def test_with_a_command_key_only_signed_commands_reach_the_scorer(
    registry: Registry, redis_url: str, redis_client: redis.Redis
) -> None:
    """Anyone who may write the input could otherwise switch models or allow-list everything:
    with FRAUD_COMMAND_KEY the decoder refuses a command without the key's signature, or one
    altered after signing (a `bad_control` dead letter), before it reaches any scorer."""
    from features.events import DeadLetter
    from features.privacy import card_token, identity
    from flows.steps import decoder

    key = "s3cret-command-key"
    s = Settings(source="redis", redis_url=redis_url, input_stream="sig:in", command_key=key)
    send_command(s, "champion", V2, registry.digest(V2))
    send_command(Settings(source="redis", redis_url=redis_url, input_stream="sig:in"), "shadow")  # unsigned
    signed_raw, unsigned_raw = [e["payload"] for e in entries(redis_client, "sig:in:{0}")]
    assert key not in signed_raw and "sig" in json.loads(signed_raw) and "sig" not in json.loads(unsigned_raw)
    tampered = signed_raw.replace(V2, V1)
    for decode_with in (decoder(identity, key.encode()), decoder(card_token(b"k"), key.encode())):
        ok = decode_with(("control", signed_raw, "sig:in:{0}#1-0"))
        assert isinstance(ok, Control) and ok.version == V2
        for raw, why in (
            (unsigned_raw, "not signed with FRAUD_COMMAND_KEY"),
            (tampered, "its signature does not match FRAUD_COMMAND_KEY"),
        ):
            dead = decode_with(("control", raw, "sig:in:{0}#2-0"))
            assert isinstance(dead, DeadLetter) and (dead.kind, dead.reason) == ("control", "bad_control")
            assert dead.detail == f"command refused: {why}" and dead.raw == raw and key not in dead.detail
            assert (dead.txn_id, dead.origin) == (None, "sig:in:{0}#2-0")  # where it was read
    other_key = decoder(identity, b"another key")(("control", signed_raw, "x#1-0"))
    assert isinstance(other_key, DeadLetter)
    assert isinstance(decoder(identity)(("control", unsigned_raw, "x#1-0")), Control)  # no key: accepted


def test_what_a_command_or_a_resume_changes_in_the_scorer(
    registry: Registry, vectors: list[FeatureVector]
) -> None:
    """Each command's effect as the next snapshot records it: the champion's version and model
    digest and a drift watch of its own; a shadow and its digest, and `shadow` with no version
    turning it off; rules named "rules" when the command names none. A resume from a snapshot (also
    the shorter ones older flows saved) serves what it names; a refused command says why."""
    s = Settings(model_registry=registry.root, threshold=None)
    scorer = load_runtime(s, need_redis=False).new_scorer()
    scorer.decide(vectors[:50])
    before, first = scorer.monitor, scorer.snapshot()  # V1's watch has seen 50 rows
    assert before is not None
    rules = "big: amount > 100000 -> review\n"
    scorer.decide(
        [
            command(registry, "champion", V2),
            command(registry, "shadow", V1),
            Control("rules", "", rules_digest(rules), rules),
        ]
    )
    assert not scorer.last.failed, scorer.last.failed
    snap = scorer.snapshot()
    assert snap[2:] == (V2, registry.digest(V2), V1, registry.digest(V1), rules, "rules")
    assert scorer.monitor is not None and scorer.monitor is not before
    assert scorer.monitor.config != before.config and scorer.monitor.concept.n == 0  # V2's own reference

    for shape in (snap, snap[:6]):  # the flow's snapshot, and one without the rules
        resumed = load_runtime(s, need_redis=False).new_scorer()
        resumed.restore(shape)
        assert resumed.snapshot()[2:] == snap[2 : len(shape)] + ("", "")[: 8 - len(shape)], len(shape)
    other_file = load_runtime(s, need_redis=False).new_scorer()  # serving V1 already
    with pytest.raises(ArtifactError, match="the registry differs between machines"):
        other_file.restore((*snap[:2], V1, "0" * 64, "", ""))  # V1, but not the model file it served
    online_only = load_runtime(s, need_redis=False).new_scorer()
    online_only.restore(snap[:1])  # the oldest shape: the online model alone
    assert online_only.champion.version == V1 and online_only.monitor is not None
    assert online_only.monitor.concept.n == 0
    watch = load_runtime(s, need_redis=False).new_scorer()
    assert pickle.dumps(watch.monitor) != first[1]
    watch.restore(first[:2])  # the online model and the watch: V1's watch resumes
    assert pickle.dumps(watch.monitor) == first[1]

    scorer.decide([Control("shadow", "", "")])
    assert scorer.shadow is None and scorer.snapshot()[4:6] == ("", "")
    no_watch = load_runtime(
        Settings(model_registry=registry.root, drift_watch=False), need_redis=False
    ).new_scorer()
    no_watch.decide([command(registry, "champion", V2)])
    assert not no_watch.last.failed and no_watch.champion.version == V2 and no_watch.monitor is None

    refused = [
        Control("champion", V2, "0" * 64),  # not the digest of V2's model file
        Control("shadow", V1, "0" * 64),
        Control("bogus", V2, ""),
    ]
    scorer.decide(refused)
    errors = [str(exc) for _, exc in scorer.last.failed]
    assert len(errors) == 3 and all("the registry differs between machines" in e for e in errors[:2])
    assert errors[2] == "the scorer has no command 'bogus'" and scorer.shadow is None
    assert scorer.champion.version == V2 and scorer.champion.digest == registry.digest(V2)


def test_the_flow_logs_each_command_it_applied_and_the_model_info_follows(
    registry: Registry, vectors: list[FeatureVector], caplog: pytest.LogCaptureFixture
) -> None:
    """An operator reads in the log which command took effect (a shadow turned off says `(off)`),
    and `fraud_model_info` names what is served now."""
    import logging

    from prometheus_client import REGISTRY

    from flows.steps import ScoringLogic

    logic = ScoringLogic(
        load_runtime(Settings(model_registry=registry.root), need_redis=False).new_scorer, None
    )
    with caplog.at_level(logging.WARNING, logger="flows.steps"):
        logic.apply([command(registry, "shadow", V2), *vectors[:5]])
        logic.apply([command(registry, "champion", V2), command(registry, "shadow"), *vectors[5:10]])
    applied = [r.getMessage() for r in caplog.records if r.getMessage().startswith("command applied")]
    assert applied == [
        f"command applied: shadow {V2}",
        f"command applied: champion {V2}",
        "command applied: shadow (off)",
    ]
    served = {"version": V2, "schema_hash": load(DEFAULT).schema_hash[:12], "shadow": ""}
    assert REGISTRY.get_sample_value("fraud_model_info", served) == 1.0
    # A refused command and a failing drift watch are logged too, saying what failed.
    caplog.clear()
    monitor = logic.scorer.monitor
    assert monitor is not None and monitor.data is not None

    def broken(*_: Any) -> list[Any]:
        raise RuntimeError("no bins")

    monitor.data.observe = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="flows.steps"):
        logic.apply([Control("champion", "xgb-19990101000000-00000000", "0" * 64), *vectors[10:15]])
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("command champion 'xgb-19990101000000-00000000' refused: ") for m in said), said
    assert "the data-drift watch failed on a batch: RuntimeError('no bins')" in said


def test_the_psi_gauges_follow_each_window_the_scorer_judges(vectors: list[FeatureVector]) -> None:
    """`fraud_feature_psi` shows the last judged data-drift window: NaN before the first, each
    window's PSI from the first one on, unchanged between windows, and after a restart the PSI of
    the window the snapshot holds."""
    from prometheus_client import REGISTRY

    from flows.steps import ScoringLogic
    from service import telemetry

    rt = load_runtime(Settings(drift_window_hours=1, drift_min_rows=20), need_redis=False)
    logic = ScoringLogic(rt.new_scorer, None)
    monitor = logic.scorer.monitor
    assert monitor is not None and monitor.data is not None
    data, names = monitor.data, monitor.data.ref.names

    def gauges() -> list[float | None]:
        return [REGISTRY.get_sample_value("fraud_feature_psi", {"feature": n}) for n in names]

    def set_all(value: float) -> None:
        for name in names:
            telemetry.FEATURE_PSI.labels(feature=name).set(value)

    set_all(-1.0)
    logic.apply(vectors[:1])
    assert data.judged == 0 and all(math.isnan(v) for v in gauges())  # nothing judged yet
    seen: list[list[float]] = []
    judged, first = 0, None
    for i in range(1, len(vectors), 25):
        set_all(-2.0)
        logic.apply(vectors[i : i + 25])
        if data.judged > judged:
            judged = data.judged
            assert gauges() == pytest.approx(list(data.last_psi), nan_ok=True)  # this window's PSI
            seen.append(list(data.last_psi))
            if judged == 1:
                first = (logic.snapshot(), seen[0])
        else:
            assert gauges() == [-2.0] * len(names)  # no new window: the gauges are left alone
    assert len(seen) >= 2 and not all(math.isnan(x) for x in seen[-1])
    assert first is not None, "no batch ended with exactly one window judged"
    for snapshot, psi in (first, (logic.snapshot(), seen[-1])):  # after one window, after them all
        set_all(-3.0)
        ScoringLogic(rt.new_scorer, snapshot).apply([])
        assert gauges() == pytest.approx(psi, nan_ok=True)


def test_a_batch_scored_row_by_row_feeds_the_drift_watch_the_same_rows(vectors: list[FeatureVector]) -> None:
    """A batch whose matrix cannot be built (a vector of the wrong length) is scored row by row:
    its valid rows still reach the data-drift watch, as float32 like a whole batch's, so the
    watch counts what it would have counted without the bad vector (0.7, at a bin edge, falls
    on either side of it as float32 or float64)."""
    from models.drift import DataDrift, reference_of

    rt = load_runtime(Settings(), need_redis=False)
    whole, fallback = rt.new_scorer(), rt.new_scorer()
    n = len(whole.names)
    ref = reference_of(np.full((100, n), 0.7), whole.names, np.full(100, 0.5))
    for scorer in (whole, fallback):
        assert scorer.monitor is not None
        scorer.monitor.data = DataDrift(ref, window_hours=1, min_rows=1)
    good = [FeatureVector(v.txn, [0.7] * n, False) for v in vectors[:20]]
    bad = FeatureVector(vectors[20].txn, [0.7] * (n - 1), False)
    whole.decide(good)
    fallback.decide([*good, bad])
    assert [it for it, _ in fallback.last.failed] == [bad] and fallback.last.drift_error is None
    counted = [s.monitor.data.total for s in (whole, fallback) if s.monitor and s.monitor.data]
    assert len(counted) == 2 and counted[0].sum() > 0 and np.array_equal(counted[0], counted[1])


def test_alerts_are_explained_one_by_one_when_the_batch_explanation_fails(
    vectors: list[FeatureVector], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If XGBoost's contributions fail for the batch of alerts, each alert is explained alone: the
    same reasons, none left unexplained."""
    rt = load_runtime(Settings(threshold=1e-6), need_redis=False)  # every vector alerts
    batch = vectors[:300]
    reference = {d.txn.txn_id: d.reasons for d in rt.new_scorer().decide(batch) if d.alert}
    assert len(reference) >= 2
    contributions = XGBScorer.contributions

    def one_at_a_time(self: XGBScorer, X: np.ndarray, top: int) -> Any:
        if len(X) > 1:
            raise MemoryError("injected: the batch call fails")
        return contributions(self, X, top)

    monkeypatch.setattr(XGBScorer, "contributions", one_at_a_time)
    scorer = rt.new_scorer()
    got = {d.txn.txn_id: d.reasons for d in scorer.decide(batch) if d.alert}
    assert repr(got) == repr(reference) and scorer.last.unexplained == 0  # repr: NaN values compare equal

    def never(self: XGBScorer, X: np.ndarray, top: int) -> Any:
        raise MemoryError("injected: every call fails")

    monkeypatch.setattr(
        XGBScorer, "contributions", never
    )  # alerts still go out, unexplained, each counted once
    alerts = [d for d in scorer.decide(batch) if d.alert]
    assert len(alerts) == len(reference) and all(d.reasons == [] for d in alerts)
    assert scorer.last.unexplained == len(alerts)
