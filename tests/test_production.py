"""Production I/O end to end, with real processes: SIGKILL and resume, Redis restarts, a cluster.

Each test replays a generated file into Redis shard streams and runs `fraud run` as separate OS
processes reading them (FRAUD_SOURCE=redis) with recovery on, until the shards are idle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis

from flows.redis_source import shard_stream
from fraud.datagen import GeneratorConfig, write_files
from service.redis_client import connect
from testkit import drill
from testkit.streams import entries
from testkit.system import free_port

pytestmark = [pytest.mark.redis, pytest.mark.e2e]
RUN = {  # small batches and 50 ms epochs: many snapshots, so kills land between and inside epochs
    "FRAUD_SOURCE_BATCH_SIZE": "100",
    "FRAUD_SNAPSHOT_INTERVAL_S": "0.05",
    "FRAUD_DECISION_LOG": "1",
    "FRAUD_THRESHOLD": "0.2",
    "FRAUD_ONLINE_WARMUP_LABELS": "100",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("prod-data")
    write_files(out, GeneratorConfig(seed=21, days=16, n_cards=220, n_merchants=60, drift_day=None))
    return out / "transactions.jsonl", out / "labels.jsonl"


def fill(client: redis.Redis, dataset: tuple[Path, Path], tag: str, shards: int) -> int:
    return drill.replay(client, dataset, tag, shards)


@pytest.fixture(scope="module")
def baseline(
    dataset: tuple[Path, Path], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, drill.Outcome]]:
    """One uninterrupted run over a single shard: the reference alerts and scores."""
    client = connect(redis_url)
    client.delete(*client.keys("base:*") or ["base:none"])
    n = fill(client, dataset, "base", 1)
    drill.finish(drill.start(drill.flow_env(redis_url, "base", 1, tmp_path_factory.mktemp("base"), **RUN)))
    outcome = drill.Outcome.read(client, "base")
    client.close()
    assert len(outcome.scores) == n and outcome.alerts
    yield n, outcome


@pytest.mark.parametrize(
    "kills", [(0.2,), (0.5,), (0.8,), (0.2, 0.5, 0.8)], ids=["20%", "50%", "80%", "all-three"]
)
def test_sigkill_then_resume_matches_an_uninterrupted_run(
    kills: tuple[float, ...],
    baseline: tuple[int, drill.Outcome],
    dataset: tuple[Path, Path],
    redis_url: str,
    tmp_path: Path,
) -> None:
    n, expected = baseline
    tag = "crash" + "-".join(str(int(k * 100)) for k in kills)
    client = connect(redis_url)
    fill(client, dataset, tag, 1)
    env = drill.flow_env(redis_url, tag, 1, tmp_path, **RUN)
    for fraction in kills:  # kill -9 once this share of transactions has been decided
        drill.kill_when(drill.start(env), lambda f=fraction: client.xlen(f"{tag}:decisions") >= f * n)
        assert client.xlen(f"{tag}:decisions") < n, "killed too late to test anything"
    drill.finish(drill.start(env))
    report = drill.Outcome.read(client, tag).compare(expected)
    assert report["missing"] == report["extra"] == report["duplicated"] == 0, report
    assert report["decisions_duplicated"] == 0 and report["scores_different"] == 0, report
    client.close()


def test_redis_restart_mid_run_loses_nothing(
    baseline: tuple[int, drill.Outcome],
    dataset: tuple[Path, Path],
    tmp_path: Path,
    redis_server_factory: Callable[..., object],
) -> None:
    n, expected = baseline
    server = redis_server_factory(appendonly=True)
    url: str = server.url  # type: ignore[attr-defined]
    client = connect(url)
    fill(client, dataset, "bounce", 1)
    proc = drill.start(drill.flow_env(url, "bounce", 1, tmp_path, **RUN))
    while client.xlen("bounce:decisions") < 0.3 * n:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the restart:\n{drill.finish(proc)[-3000:]}")
    client.close()
    server.stop()  # type: ignore[attr-defined]
    time.sleep(1.5)
    server.start()  # type: ignore[attr-defined]
    output = drill.finish(proc)
    client = connect(url)
    report = drill.Outcome.read(client, "bounce").compare(expected)
    assert report["missing"] == report["extra"] == report["duplicated"] == report["scores_different"] == 0, (
        report
    )
    assert "redis" in output.lower() and ("unreachable" in output.lower() or "retry" in output.lower()), (
        output[-2000:]
    )
    assert ":secret@" not in output  # nothing here has a password, but no URL is logged raw either
    client.close()


def test_two_processes_over_two_shards_decide_exactly_as_one_process(
    baseline: tuple[int, drill.Outcome], dataset: tuple[Path, Path], redis_url: str, tmp_path: Path
) -> None:
    """Same shards, 1 process then a 2-process cluster: every alert and every score the same."""
    n, _ = baseline
    client = connect(redis_url)
    fill(client, dataset, "solo", 2)
    drill.finish(drill.start(drill.flow_env(redis_url, "solo", 2, tmp_path, **RUN)))
    expected = drill.Outcome.read(client, "solo")
    assert len(expected.scores) == n and expected.alerts

    fill(client, dataset, "pair", 2)
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    env = drill.flow_env(redis_url, "pair", 2, tmp_path, FRAUD_RECOVERY_PARTITIONS="2", **RUN)
    drill.finish_all([drill.start(env, "-i", str(i), "-a", addresses) for i in range(2)])
    outcome = drill.Outcome.read(client, "pair")
    report = outcome.compare(expected)
    assert len(outcome.scores) == outcome.decisions_written == n, report  # every transaction decided once
    assert report["missing"] == report["extra"] == report["duplicated"] == report["scores_different"] == 0, (
        report
    )
    client.close()


def test_a_process_resumed_as_a_two_process_cluster_keeps_every_transaction_and_entity(
    baseline: tuple[int, drill.Outcome], dataset: tuple[Path, Path], redis_url: str, tmp_path: Path
) -> None:
    """One process SIGKILLed half-way, resumed as a cluster of two: the index and `pending` shards
    and the entity keys move to the worker Bytewax now routes them to, so every label still finds
    its transaction (no dead letter) and every feature vector, hence every XGBoost score, is the
    uninterrupted run's. (A scorer replica new to the cluster starts River afresh: online scores
    may differ, docs/operations.md "Limits".)"""
    n, expected = baseline
    client = connect(redis_url)
    fill(client, dataset, "resize", 1)
    env = drill.flow_env(redis_url, "resize", 1, tmp_path, FRAUD_RECOVERY_PARTITIONS="2", **RUN)
    drill.kill_when(drill.start(env), lambda: client.xlen("resize:decisions") >= 0.5 * n)
    assert client.xlen("resize:decisions") < n, "killed too late to test anything"
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    drill.finish_all([drill.start(env, "-i", str(i), "-a", addresses) for i in range(2)])
    outcome = drill.Outcome.read(client, "resize")
    assert len(outcome.scores) == outcome.decisions_written == n  # each transaction decided once
    assert client.xlen("resize:dlq") == 0  # no label lost its transaction
    xgb_different = [t for t, s in expected.scores.items() if outcome.scores[t][1] != s[1]]
    assert not xgb_different, xgb_different[:5]
    client.close()


def test_a_live_flow_decides_everything_while_one_shard_stays_empty(
    baseline: tuple[int, drill.Outcome], dataset: tuple[Path, Path], redis_url: str, tmp_path: Path
) -> None:
    """The flow starts on empty shards, the data arrives while it runs, and one of its three
    shards never gets any: idle shards must stop holding the others back (a tick after
    FRAUD_SOURCE_IDLE_MS), or nothing would be decided before the run ends, 120 s later."""
    n, _ = baseline
    client = connect(redis_url)
    env = drill.flow_env(redis_url, "live", 3, tmp_path, **{**RUN, "FRAUD_SOURCE_IDLE_EXIT_S": "120"})
    proc = drill.start(env)
    try:
        time.sleep(2)
        fill(client, dataset, "live", 2)  # shards {0} and {1}; {2} stays empty
        deadline = time.monotonic() + 60
        while client.xlen("live:decisions") < n and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        outcome = drill.Outcome.read(client, "live")
    finally:
        drill.reap(proc)
    assert len(outcome.scores) == outcome.decisions_written == n  # all decided, none twice
    assert len(outcome.alerts) == len(set(outcome.alerts)) > 0
    client.close()


def test_a_shard_read_far_ahead_waits_and_its_labels_still_find_their_transactions(
    baseline: tuple[int, drill.Outcome], dataset: tuple[Path, Path], redis_url: str, tmp_path: Path
) -> None:
    """One shard far ahead of the other (a backlog read unevenly), and the labels in shard 0
    whatever their transaction's shard (a label feed that does not know the card): a label
    that reaches the index before its transaction waits there for the other shard's watermark,
    over many epoch closes (dead-lettered as `unknown_txn` at once, it would never be learned).
    Then the other shard catches up: the same decisions, alerts and dead letters as the same
    shards read evenly."""
    n, _ = baseline
    client = connect(redis_url)
    fill(client, dataset, "src", 2)
    ahead, shard1 = drill.labels_in_shard0(client, "src", 2)
    assert len(ahead) > len(client.xrange(shard_stream("src:in", 0))), "no label to move"
    # Last in shard 1, a label (for no transaction) after everything: the shard's watermark then
    # passes all of shard 0, so nothing waits for the 30-s release at the end of the run.
    last = max(datetime.fromisoformat(json.loads(f[b"payload"])["ts"]) for _, f in ahead + shard1)
    end = json.dumps({"txn_id": "t-end", "is_fraud": False, "ts": (last + timedelta(seconds=1)).isoformat()})
    behind = [*shard1, (b"0-0", {b"kind": b"label", b"payload": end.encode()})]

    drill.write(client, "even", 0, ahead)
    drill.write(client, "even", 1, behind)
    drill.finish(drill.start(drill.flow_env(redis_url, "even", 2, tmp_path, **RUN)))
    expected = drill.Outcome.read(client, "even")
    assert len(expected.scores) == n
    assert dead_letters(client, "even") == ["t-end"]  # every other label found its transaction

    head = len(behind) // 20  # the shard behind stops at its first twentieth, a day of the world
    drill.write(client, "skew", 0, ahead)
    drill.write(client, "skew", 1, behind[:head])
    # No idle tick from the shard behind while it waits (it would stop holding the other back),
    # and no end of input: the run is stopped once it has decided everything.
    skew = {**RUN, "FRAUD_SOURCE_IDLE_MS": "600000", "FRAUD_SOURCE_IDLE_EXIT_S": "600"}
    proc = drill.start(drill.flow_env(redis_url, "skew", 2, tmp_path, **skew))
    try:
        saved = tmp_path / "skew-recovery" / "state" / "index"
        deadline, decided, still = time.monotonic() + 60, -1, 0.0
        while proc.poll() is None and time.monotonic() < deadline and still < 2.0:
            time.sleep(0.25)  # until the decisions stop: shard 0 read, the rest held back
            now = client.xlen("skew:decisions")
            still, decided = (still + 0.25 if now == decided and _bytes_under(saved) else 0.0), now
        assert proc.poll() is None, drill.finish(proc)  # the run must not have stopped
        assert 0 < decided < n // 2, decided  # rows held back
        drill.write(client, "skew", 1, behind[head:])
        deadline = time.monotonic() + 120
        while (
            proc.poll() is None
            and time.monotonic() < deadline
            and not (
                client.xlen("skew:decisions") >= n and client.xlen("skew:alerts") >= len(expected.alerts)
            )
        ):
            time.sleep(0.1)
        assert proc.poll() is None, drill.finish(proc)
    finally:
        drill.reap(proc)
    outcome = drill.Outcome.read(client, "skew")
    report = outcome.compare(expected)
    assert set(dead_letters(client, "skew")) <= {"t-end"}, client.xrange("skew:dlq", count=3)  # no label lost
    assert len(outcome.scores) == outcome.decisions_written == n, report
    assert report["missing"] == report["extra"] == report["duplicated"] == report["scores_different"] == 0, (
        report
    )
    client.close()


def dead_letters(client: redis.Redis, tag: str) -> list[str]:
    """The transaction ids of a run's dead letters."""
    return [f["txn_id"] for f in entries(client, f"{tag}:dlq")]


def _bytes_under(directory: Path) -> int:
    """Bytes in the files under `directory` (0 while it does not exist)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0
